"""Policy files: which pattern each attention site gets.

Format (TOML, version 1)::

    version = 1
    backend = "auto"                      # optional: implementation override for every site
    [default]                             # sites no rule matches
    pattern = "dense"
    [[rule]]                              # tried in order; the first match wins (per head, see below)
    match = "transformer_blocks.*.attn1"  # fnmatch glob(s) on the module path
    pattern = "sliding_window"
    window = 128

Rule keys: ``match`` (str or list), ``pattern`` and the pattern's parameters, ``grid`` (list of ints or
``"auto"``), ``globals`` (``{prefix = N}``, ``{suffix = N}`` or ``"auto"``), ``sinks``, ``heads`` (list of
ints or ``"0-3,6"``), ``skip = true`` (leave the site untouched), ``backend``, ``timesteps = [lo, hi]`` (the rule
applies only to model calls whose diffusion timestep lies in that inclusive range, see
:mod:`locattn.passes.phases`), and the mechanism keys ``mechanism`` (``"softmax"``, ``"linear"``, ``"hybrid"``),
``feature_map`` (``"elu"``, ``"relu"``, ``"favor"``), ``features`` and ``seed`` (favor only): see
:mod:`locattn.patterns.mechanism`. ``mechanism = "linear"`` takes ``pattern = "dense"`` or no pattern; ``"hybrid"``
takes a pattern whose keys get exact softmax.

Per head: rules with ``heads`` take those heads of a matching site; heads no rule took fall to the next
matching rule, then to ``[default]``. Everything is validated when loaded; errors name the file, line, rule
(index and match) and key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Union

from .patterns import PATTERNS
from .patterns.base import Pattern, PatternError
from .patterns.mechanism import DEFAULT_FEATURES, FEATURE_MAPS, KINDS, SOFTMAX, Mechanism, MechanismError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the backport (declared in pyproject.toml for python_version < '3.11')
    import tomli as tomllib

POLICY_VERSION = 1
#: the global options
TOP_KEYS = {"version", "backend", "default", "rule"}
#: keys a rule may carry besides its pattern's parameters
RULE_KEYS = {"match", "pattern", "grid", "globals", "sinks", "heads", "skip", "backend", "timesteps"}
#: keys of the attention mechanism (linear / hybrid), allowed on any rule
MECHANISM_KEYS = {"mechanism", "feature_map", "features", "seed"}


class PolicyError(ValueError):
    """A policy file or dict is invalid. The message names the file, line, rule and key."""


@dataclass(frozen=True)
class Globals:
    """Global tokens: ``prefix`` first and ``suffix`` last tokens of the sequence."""

    prefix: int = 0
    suffix: int = 0


Auto = str  # the literal "auto"


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]`` (or the ``[default]`` table, with ``match = ()``)."""

    match: tuple[str, ...]
    pattern: Pattern | None            # None only with skip
    skip: bool = False
    heads: tuple[int, ...] | None = None
    grid: tuple[int, ...] | Auto | None = None
    globals: Globals | Auto | None = None
    sinks: int = 0
    backend: str = ""
    timesteps: tuple[int | float, int | float] | None = None  # inclusive [lo, hi] of the model's timestep
    mechanism: Mechanism = SOFTMAX
    index: int = -1                    # position in the file; -1 for [default]
    line: int = dataclasses.field(default=0, compare=False)  # 1-based line of the rule header (0: unknown)
    #: ``# ...`` lines written right under the rule's header (calibration writes each rule's measured error)
    comment: str = dataclasses.field(default="", compare=False)

    def matches(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, g) for g in self.match)

    def where(self, source: str) -> str:
        loc = f"{source}:{self.line}" if self.line else source
        if self.index < 0:
            return f"{loc}: [default]"
        return f"{loc}: rule #{self.index} (match={list(self.match)!r})"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.index >= 0:
            d["match"] = self.match[0] if len(self.match) == 1 else list(self.match)
        if self.skip:
            d["skip"] = True
        if self.pattern is not None:
            d["pattern"] = self.pattern.name
            defaults = {f.name: f.default for f in dataclasses.fields(self.pattern)}
            for k, v in self.pattern.to_params().items():
                if v != (list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k]):
                    d[k] = v
        if self.heads is not None:
            d["heads"] = list(self.heads)
        if self.grid is not None:
            d["grid"] = self.grid if isinstance(self.grid, str) else list(self.grid)
        if self.globals is not None:
            if isinstance(self.globals, str):
                d["globals"] = self.globals
            else:
                d["globals"] = {k: v for k, v in (("prefix", self.globals.prefix), ("suffix", self.globals.suffix)) if v}
        if self.sinks:
            d["sinks"] = self.sinks
        if self.backend:
            d["backend"] = self.backend
        if self.timesteps is not None:
            d["timesteps"] = list(self.timesteps)
        if not self.mechanism.is_softmax:
            d["mechanism"] = self.mechanism.kind
            d["feature_map"] = self.mechanism.feature_map
            if self.mechanism.features != DEFAULT_FEATURES:
                d["features"] = self.mechanism.features
            if self.mechanism.seed:
                d["seed"] = self.mechanism.seed
        return d

    def active_at(self, t: float) -> bool:
        """Whether the rule applies to a model call at timestep ``t`` (always, without ``timesteps``)."""
        return self.timesteps is None or self.timesteps[0] <= t <= self.timesteps[1]


@dataclass(frozen=True)
class Policy:
    """A validated policy: ordered rules, a default, an optional backend override, and its source."""

    rules: tuple[Rule, ...] = ()
    default: Rule = Rule(match=(), pattern=PATTERNS["dense"]())
    backend: str = ""
    source: str = dataclasses.field(default="<dict>", compare=False)
    #: ``# ...`` lines at the top of the file (provenance of a calibrated policy); not part of the fingerprint
    comments: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                text = f.read().decode()
        except OSError as e:
            raise PolicyError(f"{path}: cannot read policy file: {e}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{path}: invalid TOML: {e}") from None
        return cls.from_dict(data, source=path, _text=text)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>", _text: str | None = None) -> "Policy":
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: a policy is a table/dict, got {type(data).__name__}")
        lines = _rule_lines(_text) if _text is not None else ([], 0)
        header, rule_comments = _comments(_text) if _text is not None else ((), [])
        unknown = set(data) - TOP_KEYS
        if unknown:
            raise PolicyError(f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
        version = data.get("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise PolicyError(f"{source}: key 'version': unsupported policy version {version!r} "
                              f"(this locattn reads version {POLICY_VERSION})")
        backend = data.get("backend", "")
        if not isinstance(backend, str):
            raise PolicyError(f"{source}: key 'backend': expected a string, got {backend!r}")
        default_d = data.get("default", {"pattern": "dense"})
        default = _parse_rule(default_d, -1, source, lines[1])
        if default.heads is not None:
            raise PolicyError(f"{default.where(source)}: key 'heads': the default applies to the remaining heads")
        rules_d = data.get("rule", [])
        if isinstance(rules_d, dict):
            rules_d = [rules_d]
        if not isinstance(rules_d, list):
            raise PolicyError(f"{source}: key 'rule': expected an array of tables ([[rule]])")
        rules = tuple(_parse_rule(r, i, source, lines[0][i] if i < len(lines[0]) else 0)
                      for i, r in enumerate(rules_d))
        _check_head_overlap(rules, source)
        rules = tuple(dataclasses.replace(r, comment=rule_comments[i]) if i < len(rule_comments) else r
                      for i, r in enumerate(rules))
        return cls(rules=rules, default=default, backend=backend, source=source, comments=header)

    @classmethod
    def coerce(cls, p: Union["Policy", dict, str, os.PathLike, None]) -> "Policy":
        """A Policy from a Policy, a dict, a path, or None (``$LOCATTN_POLICY`` if set, else all-dense)."""
        if isinstance(p, Policy):
            return p
        if isinstance(p, dict):
            return cls.from_dict(p)
        if p is None:
            env = os.environ.get("LOCATTN_POLICY")
            return cls.load(env) if env else cls()
        return cls.load(p)

    # -- output --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": POLICY_VERSION}
        if self.backend:
            d["backend"] = self.backend
        d["default"] = self.default.to_dict()
        if self.rules:
            d["rule"] = [r.to_dict() for r in self.rules]
        return d

    def to_toml(self, comments: bool = True) -> str:
        """The policy as TOML; with ``comments``, :attr:`comments` head the file and each rule's
        :attr:`Rule.comment` follows its ``[[rule]]`` line (``Policy.load`` reads both back)."""
        if not comments:
            return _dump_toml(self.to_dict())
        return _dump_toml(self.to_dict(), self.comments, [r.comment for r in self.rules])

    @property
    def timestep_rules(self) -> tuple[Rule, ...]:
        """The rules that carry ``timesteps``."""
        return tuple(r for r in self.rules if r.timesteps is not None)

    def fingerprint(self) -> str:
        """Content hash (part of every cache key derived from this policy); comments are not part of it."""
        return hashlib.sha256(self.to_toml(comments=False).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# parsing and validation


def _rule_lines(text: str) -> tuple[list[int], int]:
    rule_lines, default_line = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if re.match(r"^\[\[\s*rule\s*\]\]", s):
            rule_lines.append(n)
        elif re.match(r"^\[\s*default\s*\]", s):
            default_line = n
    return rule_lines, default_line


def _comments(text: str) -> tuple[tuple[str, ...], list[str]]:
    """The ``#`` lines heading the file, and per ``[[rule]]`` the ``#`` lines right under its header."""
    header: list[str] = []
    rules: list[str] = []
    lines = text.splitlines()
    for line in lines:
        if not line.strip().startswith("#"):
            break
        header.append(line.strip()[1:].strip())
    for n, line in enumerate(lines):
        if re.match(r"^\[\[\s*rule\s*\]\]", line.strip()):
            own = []
            for nxt in lines[n + 1:]:
                if not nxt.strip().startswith("#"):
                    break
                own.append(nxt.strip()[1:].strip())
            rules.append("\n".join(own))
    return tuple(header), rules


def _err(source: str, rule_index: int, match, line: int, key: str, msg: str) -> PolicyError:
    loc = f"{source}:{line}" if line else source
    who = "[default]" if rule_index < 0 else f"rule #{rule_index} (match={list(match)!r})"
    return PolicyError(f"{loc}: {who}: key '{key}': {msg}")


def _check_int(v, key, minimum, err) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise err(key, f"expected an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise err(key, f"must be >= {minimum}, got {v}")
    return v


def parse_heads(v, err) -> tuple[int, ...]:
    if isinstance(v, str):
        out: list[int] = []
        for part in v.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if b < a:
                    raise err("heads", f"empty range {part!r}")
                out.extend(range(a, b + 1))
            elif part.isdigit():
                out.append(int(part))
            else:
                raise err("heads", f"expected a list of ints or ranges like \"0-3,6\", got {v!r}")
        v = out
    if not isinstance(v, list) or not v:
        raise err("heads", f"expected a non-empty list of head indices or a range string, got {v!r}")
    heads = tuple(_check_int(h, "heads", 0, err) for h in v)
    if len(set(heads)) != len(heads):
        raise err("heads", f"repeated head index in {list(heads)}")
    return tuple(sorted(heads))


def _parse_rule(d: Any, index: int, source: str, line: int) -> Rule:
    match: tuple[str, ...] = ()
    if not isinstance(d, dict):
        raise _err(source, index, match, line, "rule", f"expected a table, got {d!r}")

    def err(key, msg):
        return _err(source, index, match, line, key, msg)

    if index >= 0:
        m = d.get("match")
        if isinstance(m, str):
            match = (m,)
        elif isinstance(m, list) and m and all(isinstance(x, str) for x in m):
            match = tuple(m)
        else:
            raise err("match", f"expected a glob string or a non-empty list of globs, got {m!r}")
    elif "match" in d:
        raise err("match", "[default] takes no 'match'")

    skip = d.get("skip", False)
    if not isinstance(skip, bool):
        raise err("skip", f"expected true/false, got {skip!r}")
    mechanism = _parse_mechanism(d, skip, err)
    name = d.get("pattern")
    if name is None and mechanism.kind == "linear":
        name = "dense"  # linear attention attends every key the site allows
    if name is None and not skip:
        raise err("pattern", f"missing; one of {sorted(PATTERNS)} (or skip = true)")
    pattern = None
    params: set[str] = set()
    if name is not None:
        pattern, params = _parse_pattern(name, d, err)
    unknown = set(d) - RULE_KEYS - MECHANISM_KEYS - params
    if unknown:
        allowed = RULE_KEYS | MECHANISM_KEYS | set(PATTERNS[name].params if name in PATTERNS else ())
        allowed = sorted(allowed - ({"match"} if index < 0 else set()))
        raise err(sorted(unknown)[0], f"unknown key for pattern {name!r}; allowed keys: {allowed}")

    heads = parse_heads(d["heads"], err) if "heads" in d else None
    if skip and heads is not None:
        raise err("heads", "skip = true applies to whole sites; it cannot take a subset of heads")
    grid = d.get("grid")
    if grid is not None:
        if grid == "auto":
            pass
        elif isinstance(grid, list) and grid and all(not isinstance(x, bool) and isinstance(x, int) and x >= 1 for x in grid):
            if len(grid) > 3:
                raise err("grid", f"at most 3 axes are supported, got {len(grid)}")
            grid = tuple(grid)
        else:
            raise err("grid", f"expected \"auto\" or a list of 1-3 positive integers, got {grid!r}")
    glob = d.get("globals")
    if glob is not None:
        if glob == "auto":
            pass
        elif isinstance(glob, dict) and glob and set(glob) <= {"prefix", "suffix"}:
            glob = Globals(**{k: _check_int(v, f"globals.{k}", 0, err) for k, v in glob.items()})
        else:
            raise err("globals", f"expected {{prefix = N}}, {{suffix = N}} or \"auto\", got {glob!r}")
    sinks = _check_int(d.get("sinks", 0), "sinks", 0, err)
    timesteps = _parse_timesteps(d["timesteps"], index, skip, err) if "timesteps" in d else None
    backend = d.get("backend", "")
    if not isinstance(backend, str):
        raise err("backend", f"expected a string, got {backend!r}")
    if pattern is not None and isinstance(grid, tuple):
        for k, (_, per_axis, _) in pattern.params.items():
            v = getattr(pattern, k)
            if per_axis and isinstance(v, tuple) and len(v) != len(grid):
                raise err(k, f"has {len(v)} entries but grid {list(grid)} has {len(grid)} axes")
        try:
            pattern.validate(grid)
        except ValueError as e:
            raise err("grid", str(e)) from None
    if pattern is not None and pattern.local is False and (grid is not None or glob is not None or sinks):
        raise err("grid" if grid is not None else "globals" if glob is not None else "sinks",
                  "the dense pattern takes no grid, globals or sinks")
    if mechanism.kind == "linear" and pattern is not None and pattern.local:
        raise err("pattern", f"mechanism = \"linear\" attends every key the site allows (pattern = \"dense\" or "
                             f"none), got {pattern.name!r}; mechanism = \"hybrid\" gives a pattern's keys exact softmax")
    if mechanism.kind == "hybrid" and pattern is not None and pattern.dynamic:
        raise err("mechanism", "mechanism = \"hybrid\" takes a static local pattern (its exact keys are known at "
                               "compile time), not \"dynamic\"")
    return Rule(match=match, pattern=pattern, skip=skip, heads=heads, grid=grid, globals=glob, sinks=sinks,
                backend=backend, timesteps=timesteps, mechanism=mechanism, index=index, line=line)


def _parse_timesteps(v, index: int, skip: bool, err) -> tuple[int | float, int | float]:
    """``[lo, hi]``: two finite numbers, lo <= hi, in the units of the model's ``timestep`` input."""
    if index < 0:
        raise err("timesteps", "[default] applies outside every range; give 'timesteps' to a [[rule]]")
    if skip:
        raise err("timesteps", "skip = true applies to every call; use pattern = \"dense\" for a range of timesteps")
    ok = isinstance(v, list) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not ok:
        raise err("timesteps", f"expected [lo, hi], two finite numbers (the model's timestep units), got {v!r}")
    if v[0] > v[1]:
        raise err("timesteps", f"empty range [{v[0]}, {v[1]}]: lo must be <= hi")
    return (v[0], v[1])


def _parse_pattern(name, d: dict, err, prefix: str = "") -> tuple[Pattern, set[str]]:
    """The pattern ``name`` with its parameters from table ``d`` (other keys are the caller's); ``prefix``
    names a nested table in errors (``base.``). Returns the pattern and the parameter keys it used."""
    if not isinstance(name, str) or name not in PATTERNS:
        raise err(prefix + "pattern", f"unknown pattern {name!r}; known: {sorted(PATTERNS)}")
    cls = PATTERNS[name]
    kw, params = {}, set()
    for k, (typ, per_axis, minimum) in cls.params.items():
        if k not in d:
            continue
        params.add(k)
        if typ is Pattern:
            kw[k] = _parse_nested(d[k], prefix + k, err)
        else:
            kw[k] = _parse_param(d[k], typ, per_axis, minimum, prefix + k, err)
    try:
        return cls(**kw), params
    except PatternError as e:
        raise err(prefix + (e.key or "pattern"), str(e)) from None


def _parse_nested(v, key: str, err) -> Pattern:
    """An inline pattern table (``base = {pattern = "sliding_window", window = 128}``): a static local pattern."""
    if not isinstance(v, dict) or "pattern" not in v:
        raise err(key, f"expected an inline table with a 'pattern', e.g. {{pattern = \"sliding_window\", "
                       f"window = 128}}, got {v!r}")
    pattern, used = _parse_pattern(v["pattern"], v, err, key + ".")
    unknown = set(v) - used - {"pattern"}
    if unknown:
        raise err(f"{key}.{sorted(unknown)[0]}", f"unknown key for pattern {v['pattern']!r}; allowed keys: "
                                                 f"{sorted(pattern.params)}")
    if not pattern.local or pattern.dynamic:
        raise err(key, f"must be a static local pattern, got {pattern.name!r}")
    return pattern


def _parse_mechanism(d: dict, skip: bool, err) -> Mechanism:
    """The rule's :class:`Mechanism` from ``mechanism`` / ``feature_map`` / ``features`` / ``seed``."""
    kind = d.get("mechanism", "softmax")
    if not isinstance(kind, str) or kind not in KINDS:
        raise err("mechanism", f"unknown mechanism {kind!r}; known: {list(KINDS)}")
    extra = sorted(k for k in ("feature_map", "features", "seed") if k in d)
    if kind == "softmax":
        if extra:
            raise err(extra[0], "applies to mechanism = \"linear\" or \"hybrid\" only")
        return SOFTMAX
    if skip:
        raise err("mechanism", "skip = true leaves the site untouched; it takes no mechanism")
    fm = d.get("feature_map", "")
    if fm != "" and (not isinstance(fm, str) or fm not in FEATURE_MAPS):
        raise err("feature_map", f"unknown feature map {fm!r}; known: {list(FEATURE_MAPS)}")
    kw = {}
    for key, minimum in (("features", 1), ("seed", 0)):
        if key in d:
            kw[key] = _check_int(d[key], key, minimum, err)
    try:
        return Mechanism(kind, fm, **kw)
    except MechanismError as e:
        raise err(extra[-1] if extra else "mechanism", str(e)) from None


def _parse_param(v, typ, per_axis, minimum, key, err):
    def one(x):
        if typ is bool:
            if not isinstance(x, bool):
                raise err(key, f"expected true/false, got {x!r}")
            return x
        if typ is float:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise err(key, f"expected a number, got {x!r}")
            return float(x)
        return _check_int(x, key, minimum, err)

    if isinstance(v, list):
        if not per_axis:
            raise err(key, f"expected a single value, got a list {v!r}")
        if not 1 <= len(v) <= 3:
            raise err(key, f"expected 1-3 per-axis values, got {len(v)}")
        return tuple(one(x) for x in v)
    return one(v)


def _check_head_overlap(rules: tuple[Rule, ...], source: str) -> None:
    # rules for different timestep ranges may give the same heads of the same sites different patterns
    seen: dict[tuple, list[tuple[int, set[int]]]] = {}
    for r in rules:
        if r.heads is None:
            continue
        for i, hs in seen.get((r.match, r.timesteps), []):
            both = hs & set(r.heads)
            if both:
                raise PolicyError(f"{r.where(source)}: key 'heads': heads {sorted(both)} are already taken by "
                                  f"rule #{i} with the same match")
        seen.setdefault((r.match, r.timesteps), []).append((r.index, set(r.heads)))


# ----------------------------------------------------------------------------------------------------------
# a minimal TOML writer for policy dicts (strings, ints, floats, bools, lists of scalars, inline/array tables)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # finite (validated): Python's repr is valid TOML and round-trips exactly
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _dump_toml(d: dict[str, Any], header: tuple[str, ...] = (), rule_comments: list[str] = ()) -> str:
    out = [f"# {c}".rstrip() for c in header] + ([""] if header else [])
    out += [f"{k} = {_toml_value(v)}" for k, v in d.items() if k not in ("default", "rule")]
    if "default" in d:
        out += ["", "[default]"] + [f"{k} = {_toml_value(v)}" for k, v in d["default"].items()]
    for i, r in enumerate(d.get("rule", [])):
        note = rule_comments[i] if i < len(rule_comments) else ""
        out += ["", "[[rule]]"] + [f"# {c}".rstrip() for c in note.splitlines()]
        out += [f"{k} = {_toml_value(v)}" for k, v in r.items()]
    return "\n".join(out) + "\n"
