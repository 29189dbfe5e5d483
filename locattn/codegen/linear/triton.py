from .common import LinearImplementation


class LinearTriton(LinearImplementation):
    name = "linear_triton"

    def can_run(self, call):
        return False, "todo"
