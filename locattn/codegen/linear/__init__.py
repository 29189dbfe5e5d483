"""The linear and hybrid attention mechanisms (:mod:`locattn.patterns.mechanism`), one folder per mechanism family
as in flash-linear-attention, the naive reference next to the kernels:

* ``features.py``  the feature maps (elu, relu, favor) and their backward,
* ``naive.py``     ``linear_reference``: the materialised definition, fp64 for fp64 inputs, any device,
* ``common.py``    the algebra shared by the fast paths over a family of linear sums (all keys, the pattern's keys)
                   and the hybrid's merge with a softmax implementation's (out, lse),
* ``chunked.py``   ``linear_chunked``: the sums in chunked PyTorch (the CPU path); ``intervals.py``: the pattern's
                   keys of 1-D patterns by prefix sums,
* ``triton.py``    ``linear_triton``: the sums as Triton kernels (``triton_kernels.py``), CUDA or the interpreter.
"""
