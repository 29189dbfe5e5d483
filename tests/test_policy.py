"""Policy files: validation errors name file, line, rule and key; round trips; per-head assignment."""

import pytest
import torch
import torch.nn.functional as F

import locattn
from locattn.policy import Policy, PolicyError

GOOD = '''version = 1
backend = "blocked"

[default]
pattern = "dense"

[[rule]]
match = ["blocks.*.attn", "x"]
pattern = "neighborhood"
kernel = [3, 5]
dilation = [1, 2]
grid = [8, 16]
globals = {prefix = 2}
heads = "0-1,3"

[[rule]]
match = "*.attn2"
skip = true
'''


def _write(tmp_path, text):
    p = tmp_path / "policy.toml"
    p.write_text(text)
    return p


def test_round_trip(tmp_path):
    p = Policy.load(_write(tmp_path, GOOD))
    assert p.rules[0].heads == (0, 1, 3) and p.rules[0].pattern.kernel == (3, 5) and p.backend == "blocked"
    again = Policy.load(_write(tmp_path, p.to_toml()))
    assert again == p
    assert Policy.from_dict(p.to_dict()) == p
    assert again.fingerprint() == p.fingerprint()
    assert Policy.from_dict({"default": {"pattern": "sliding_window", "window": 3}}).fingerprint() != p.fingerprint()


BAD = [
    ("unknown pattern", 'pattern = "nope"', r":6: rule #0 \(match=\['a'\]\): key 'pattern': unknown pattern 'nope'"),
    ("unknown key", 'pattern = "sliding_window"\nwindw = 3', r":6: rule #0 \(match=\['a'\]\): key 'windw': unknown key"),
    ("wrong type", 'pattern = "sliding_window"\nwindow = "3"', r"key 'window': expected an integer, got '3'"),
    ("out of range", 'pattern = "neighborhood"\nkernel = 0', r"key 'kernel': must be >= 1, got 0"),
    ("bool for int", 'pattern = "sliding_window"\nwindow = true', r"key 'window': expected an integer"),
    ("grid arity", 'pattern = "neighborhood"\nkernel = [3, 3]\ngrid = [4, 4, 4]', r"key 'kernel': has 2 entries but grid"),
    ("kernel > grid", 'pattern = "neighborhood"\nkernel = [9, 3]\ngrid = [5, 7]', r"key 'grid': kernel 9 x dilation 1 = 9 on axis 0 exceeds"),
    ("stride > kernel", 'pattern = "strided"\nkernel = 3\nstride = 4\ngrid = [9]', r"stride 4 on axis 0 exceeds the kernel 3"),
    ("shift >= window", 'pattern = "shifted_window"\nwindow = 4\nshift = 4\ngrid = [8]', r"shift 4 on axis 0 must be smaller"),
    ("bad heads", 'pattern = "dense"\nheads = "3-1"', r"key 'heads': empty range"),
    ("bad globals", 'pattern = "neighborhood"\nkernel = 3\nglobals = {middle = 3}', r"key 'globals'"),
    ("dense with grid", 'pattern = "dense"\ngrid = [4, 4]', r"the dense pattern takes no grid"),
    ("skip with heads", 'skip = true\nheads = [0]', r"skip = true applies to whole sites"),
    ("missing pattern", 'window = 3', r"key 'pattern': missing"),
    ("timesteps not a pair", 'pattern = "dense"\ntimesteps = [800]', r":6: rule #0 \(match=\['a'\]\): key 'timesteps': "
     r"expected \[lo, hi\], two finite numbers"),
    ("timesteps strings", 'pattern = "dense"\ntimesteps = ["a", "b"]', r"key 'timesteps': expected \[lo, hi\]"),
    ("timesteps bool", 'pattern = "dense"\ntimesteps = [true, 3]', r"key 'timesteps': expected \[lo, hi\]"),
    ("timesteps empty", 'pattern = "dense"\ntimesteps = [900, 800]', r"key 'timesteps': empty range \[900, 800\]"),
    ("timesteps infinite", 'pattern = "dense"\ntimesteps = [0, inf]', r"key 'timesteps': expected \[lo, hi\]"),
    ("timesteps with skip", 'skip = true\ntimesteps = [0, 1]', r"key 'timesteps': skip = true applies to every call"),
]


@pytest.mark.parametrize("what,body,msg", BAD, ids=[b[0] for b in BAD])
def test_errors_name_file_line_rule_key(tmp_path, what, body, msg):
    path = _write(tmp_path, f'version = 1\n\n[default]\npattern = "dense"\n\n[[rule]]\nmatch = "a"\n{body}\n')
    with pytest.raises(PolicyError, match=msg) as e:
        Policy.load(path)
    assert str(e.value).startswith(str(path))


def test_file_level_errors(tmp_path):
    with pytest.raises(PolicyError, match="invalid TOML"):
        Policy.load(_write(tmp_path, "version = = 1"))
    with pytest.raises(PolicyError, match="unsupported policy version 2"):
        Policy.load(_write(tmp_path, "version = 2"))
    with pytest.raises(PolicyError, match=r"unknown top-level key\(s\) \['rules'\]"):
        Policy.load(_write(tmp_path, 'version = 1\n[[rules]]\nmatch = "a"\n'))
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.load(tmp_path / "missing.toml")
    with pytest.raises(PolicyError, match=r"rule #1 .*key 'heads': heads \[1\] are already taken by rule #0"):
        Policy.from_dict({"rule": [{"match": "a", "pattern": "dense", "heads": [0, 1]},
                                   {"match": "a", "pattern": "dense", "heads": [1, 2]}]})


class Heads(torch.nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


def test_per_head_rules_compose_into_one_op():
    q = torch.randn(1, 6, 20, 8)
    pol = {"rule": [
        {"match": "*", "heads": [0, 1], "pattern": "sliding_window", "window": 2},
        {"match": "*", "heads": "4-5", "pattern": "sliding_window", "window": 5},
        {"match": "*", "pattern": "sliding_window", "window": 1},   # takes the remaining heads 2, 3
    ]}
    rep = locattn.explain(Heads(), q, policy=pol)
    d = rep.decisions[0]
    assert d.spec.describe() == ("h0-1:sliding_window(window=2); h4-5:sliding_window(window=5); "
                                 "h2-3:sliding_window(window=1)")
    y = torch.compile(Heads(), backend=locattn.backend(pol, inductor=False))(q)
    for heads, w in (((0, 1), 2), ((2, 3), 1), ((4, 5), 5)):
        idx = torch.arange(20)
        m = (idx[:, None] - idx[None, :]).abs() <= w
        ref = F.scaled_dot_product_attention(q[:, list(heads)], q[:, list(heads)], q[:, list(heads)], attn_mask=m)
        torch.testing.assert_close(y[:, list(heads)], ref)


def test_site_errors_name_the_site():
    q = torch.randn(1, 2, 20, 8)
    with pytest.raises(Exception, match=r"at site '<root>': grid 4x4 has 16 tokens .* the sequence has 20 tokens"):
        locattn.explain(Heads(), q, policy={"default": {"pattern": "neighborhood", "kernel": 3, "grid": [4, 4]}})
    with pytest.raises(Exception, match=r"heads \[5\] do not exist at site '<root>' \(it has 2 heads\)"):
        locattn.explain(Heads(), q, policy={"rule": [{"match": "*", "pattern": "dense", "heads": [5]}]})
    with pytest.raises(Exception, match=r"no token grid could be inferred"):
        locattn.explain(Heads(), q, policy={"default": {"pattern": "neighborhood", "kernel": 3, "grid": "auto"}})


def test_show_draws_a_pattern(tmp_path):
    pytest.importorskip("matplotlib")
    from locattn.cli import main

    out = tmp_path / "na.png"
    assert main(["show", "--pattern", "neighborhood", "--grid", "20,24", "--param", "kernel=5,7",
                 "--query", "0,3", "--block", "16", "-o", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_policy_files_load_on_python_310_without_tomllib(tmp_path):
    """Python 3.10 has no ``tomllib``: the policy module falls back to the ``tomli`` backport (a dependency there).

    The child process stands in for 3.10 without needing the backport installed here (on 3.11 pip does not install it,
    and the parent may only see setuptools' vendored copy): ``tomli`` is the stdlib ``tomllib`` under the backport's
    name (the backport's API is the same), and ``tomllib`` itself is made unimportable."""
    import subprocess
    import sys

    path = _write(tmp_path, GOOD)
    code = ("import sys, torch, tomllib\n"
            "sys.modules['tomli'] = tomllib                      # the backport's API is tomllib's\n"
            "sys.modules['tomllib'] = None                       # no tomllib, as on 3.10\n"
            "sys.version_info = (3, 10, 14, 'final', 0)\n"
            "from locattn.policy import Policy\n"
            f"print(Policy.load({str(path)!r}).rules[0].pattern.name)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "neighborhood"


def test_per_head_backends_one_per_site_and_the_option_wins():
    """Head groups whose rules name different backends are an error naming the site and both rules (the op runs one
    backend per call); ``options={"backend": ...}`` overrides a rule's backend, with a warning."""
    q = torch.randn(1, 4, 20, 8)
    two = {"rule": [{"match": "*", "heads": [0, 1], "pattern": "sliding_window", "window": 2, "backend": "blocked"},
                    {"match": "*", "pattern": "sliding_window", "window": 3, "backend": "reference"}]}
    with pytest.raises(Exception, match=r"site .<root>.: its head groups name different backends \(heads 0-1: "
                                          r"blocked from .*rule #0.*; heads 2-3: reference from .*rule #1"):
        locattn.explain(Heads(), q, policy=two)
    one = {"rule": [{"match": "*", "pattern": "sliding_window", "window": 2, "backend": "blocked"}]}
    assert locattn.explain(Heads(), q, policy=one).decisions[0].backend == "blocked"
    with pytest.warns(locattn.LocattnWarning, match=r"options backend='reference' overrides backend='blocked'"):
        rep = locattn.explain(Heads(), q, policy=one, backend="reference")
    assert rep.decisions[0].backend == "reference"
    locattn.reset_counters()
    torch._dynamo.reset()
    with pytest.warns(locattn.LocattnWarning):
        torch.compile(Heads(), backend="locattn", options={"policy": one, "backend": "reference"})(q)
    assert locattn.counters()["dispatch"] == {"reference": 1}
