"""Grafting: a short fine-tune that wins back the quality a policy's rewrite costs.

    model = locattn.graft(model, "policy.toml", batches, steps=300)   # then torch.compile(model, ...) as usual

The model as given is the *teacher* (a frozen copy, exact dense attention, eager); the same model compiled with
the locattn backend under ``policy`` is the *student*. Every site the policy changes (a local pattern, or a
linear / hybrid mechanism on some heads) is distilled: the output of the module holding the site (e.g. a
transformer's ``self_attn``: attention plus its projections) is pulled towards the teacher's output of the same
module, by the mean over sites of their MSE (grafting, LoLCATs' attention transfer). Where the student's
module takes its input from:

* ``inputs="teacher"`` (default; grafting's and LoLCATs' layer-local distillation): each student module is
  called on the teacher's input to that module, so every site learns to replace its dense original in
  isolation and the backward runs through the attention modules only (no gradient reaches anything else,
  whatever ``params`` says). Each module holding changed sites is compiled on its own with its sites'
  decided spec and run alone (the rest of the student never runs); a module whose sites were decided
  differently from one another runs inside the whole compiled student with its input substituted by a forward
  pre-hook instead. The student module gets exactly the teacher's arguments: a KV-cache object among them would
  be updated by both (transformers' Llama attention does not, as checked on transformers 5.24; call models
  that would without caching);
* ``inputs="student"``: end to end, each module sees the student's own activations, so earlier sites' errors
  are trained against too, optionally plus ``output_weight`` x the MSE of the models' final outputs.

* ``params="attention"``: only the parameters of the modules holding changed sites train (their q / k / v /
  out projections and whatever else those modules own, e.g. q/k norms); ``"all"``: every parameter. The others
  keep ``requires_grad = False`` during grafting (restored after) and are never in the optimizer, so they stay
  bit-identical.
* Memory stays bounded: the teacher's outputs are computed per step, under ``no_grad``; only the current
  step's site outputs are held.
* The student runs in eval mode (no dropout, which would also keep SDPA sites from being rewritten); the
  model's mode and ``requires_grad`` flags are restored at the end.
* Runs where the model's parameters are (CPU or GPU); each sample is moved there.
* Like :func:`locattn.explain`, it resets Dynamo's caches (before discovering the sites and after training).

Errors (``ValueError``): ``steps`` < 1, ``lr`` <= 0, unknown ``params``, no sample, or a policy that changes no
site of the model (nothing to graft).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import LocattnBackend
from .counters import log
from .passes.rewrite import Decision
from .patterns.spec import SiteSpec
from .policy import Globals, Policy, Rule

PARAMS = ("attention", "all")
INPUTS = ("teacher", "student")


def _first_tensor(x: Any) -> torch.Tensor | None:
    """A module's or model's output as one tensor: itself, the first tensor of a tuple / list, or of a
    dict-like output (``logits`` of a transformers ``ModelOutput`` comes first)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for y in x:
            t = _first_tensor(y)
            if t is not None:
                return t
    return None


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(y, device) for y in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _as_call(sample: Any, device: torch.device) -> tuple[tuple, dict]:
    """A sample as ``(args, kwargs)``: a tensor is one positional argument, a tuple / list the positional
    arguments, a dict the keyword arguments."""
    sample = _to(sample, device)
    if isinstance(sample, dict):
        return (), sample
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    return (sample,), {}


def _cycle(samples: Iterable) -> Iterator:
    """The samples over and over (a re-iterable such as a list or DataLoader), or once (an iterator)."""
    while True:
        it = iter(samples)
        got = False
        for s in it:
            got = True
            yield s
        if not got:
            raise ValueError("graft: samples is empty")
        if it is samples:  # a one-shot iterator: exhausted
            return


def changed_sites(decisions: list[Decision]) -> list[Decision]:
    """The rewritten sites whose spec is not exact dense softmax on every head (what grafting distils)."""
    return [d for d in decisions if d.rewritten and d.spec is not None and not d.spec.is_dense]


def spec_policy(spec: SiteSpec, backend: str = "") -> Policy:
    """A policy that gives every site the decided ``spec`` (its head groups as ``match = "*"`` rules): how a module
    compiled on its own, where its sites' paths are ``""``, gets the decision made in the whole model."""
    rules, default = [], None
    for g in spec.groups:
        lay = g.layout
        kw = dict(pattern=g.pattern, grid=lay.grid if g.pattern.local else None, sinks=lay.sinks, backend=backend,
                  globals=Globals(lay.prefix, lay.suffix) if (lay.prefix or lay.suffix) else None,
                  mechanism=g.mechanism)
        if g.heads is None:
            default = Rule(match=(), **kw)
        else:
            rules.append(Rule(match=("*",), heads=g.heads, index=len(rules), **kw))
    return Policy(rules=tuple(rules), default=default or Policy().default, source="<graft: decided spec>")


def _discover(model: nn.Module, policy: Policy, backend: str, args: tuple, kwargs: dict) -> list[Decision]:
    torch._dynamo.reset()
    b = LocattnBackend(policy, backend=backend, inductor=False)
    try:
        with torch.no_grad():
            torch.compile(model, backend=b)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return b.decisions


def graft(model: nn.Module, policy: Any, samples: Iterable, *, steps: int, lr: float = 1e-4,
          params: str = "attention", progress: bool = True, inputs: str = "teacher", output_weight: float = 0.0,
          save: str | None = None, history: list | None = None, backend: str = "", inductor: bool = False
          ) -> nn.Module:
    """Fine-tune ``model`` in place so that, compiled with the locattn backend under ``policy``, each changed
    attention site's module output matches the dense model's (module docstring). Returns ``model``.

    ``samples``: an iterable of model inputs, each a tensor (one positional argument), a tuple of arguments or a
    dict of keyword arguments; cycled for ``steps`` optimizer steps (Adam, ``lr``). ``progress``: print the loss
    ~20 times to stderr. ``inputs``: ``"teacher"`` or ``"student"`` (module docstring); ``output_weight``
    (``inputs="student"`` only): weight of the final outputs' MSE. ``save``: write the trained ``state_dict`` there (``torch.save``). ``history``: a list
    that gets one dict per step (``step``, ``loss``, ``sites``: per-site MSE by module path, ``output``,
    ``seconds``); the loss curve. ``backend``: an implementation override for the student's sites;
    ``inductor``: compile the student with Inductor (default: the rewritten graph runs eagerly, which starts
    faster on CPU).

    Example::

        batches = [tokens[i:i + 1] for i in range(0, 64)]
        locattn.graft(lm, {"rule": [{"match": "*.self_attn", "pattern": "sliding_window", "window": 64,
                                     "sinks": 4, "mechanism": "hybrid"}]}, batches, steps=200)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"graft: steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"graft: lr must be > 0, got {lr!r}")
    if params not in PARAMS:
        raise ValueError(f"graft: params must be one of {list(PARAMS)}, got {params!r}")
    if inputs not in INPUTS:
        raise ValueError(f"graft: inputs must be one of {list(INPUTS)}, got {inputs!r}")
    if output_weight and inputs == "teacher":
        raise ValueError("graft: output_weight needs inputs='student' (with the teacher's inputs substituted per "
                         "module, the student's final output is no model's output)")
    policy = Policy.coerce(policy)
    it = iter(samples)
    first = next(it, None)
    if first is None:
        raise ValueError("graft: samples is empty")
    if it is samples:  # a one-shot iterator: keep the sample taken for discovery
        samples = itertools.chain([first], it)
    device = next(model.parameters()).device
    args, kwargs = _as_call(first, device)

    decisions = _discover(model, policy, backend, args, kwargs)
    sites = changed_sites(decisions)
    if not sites:
        raise ValueError(f"graft: policy {policy.source!r} changes no attention site of this model (every site is "
                         "left alone or stays exact dense softmax): nothing to graft")
    paths = sorted({d.site.path for d in sites})
    if "" in paths:
        raise ValueError("graft: a changed attention site lies in the root module's own forward; grafting compares "
                         "the outputs of the modules holding the sites, so the attention must live in a submodule")
    modules = {p: model.get_submodule(p) for p in paths}
    if params == "attention":
        train = list({id(p): p for m in modules.values() for p in m.parameters()}.values())
    else:
        train = list(model.parameters())
    if not train:
        raise ValueError(f"graft: the modules holding the changed sites ({paths}) have no parameters to train")

    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_modules = {p: teacher.get_submodule(p) for p in paths}
    t_out: dict[str, torch.Tensor] = {}
    s_out: dict[str, torch.Tensor] = {}
    t_in: dict[str, tuple] = {}

    def hook(store, name):
        def fn(_mod, _args, out):
            store[name] = _first_tensor(out)
        return fn

    def keep_input(name):
        def fn(_mod, args, kwargs):
            t_in[name] = (args, kwargs)
        return fn

    def teacher_input(name):  # the student module runs on the teacher's input (inputs="teacher")
        def fn(_mod, _args, _kwargs):
            return t_in[name]
        return fn

    handles = [modules[p].register_forward_hook(hook(s_out, p)) for p in paths]
    handles += [t_modules[p].register_forward_hook(hook(t_out, p)) for p in paths]
    alone: dict[str, nn.Module] = {}  # inputs="teacher": modules compiled and run on their own
    backends: dict[str, LocattnBackend] = {}
    if inputs == "teacher":
        handles += [t_modules[p].register_forward_pre_hook(keep_input(p), with_kwargs=True) for p in paths]
        shared: dict[tuple, LocattnBackend] = {}  # one backend per decided spec: layers of one class share a graph
        for p in paths:
            decided = {(d.spec.to_json() if d.spec is not None else None, d.backend) for d in decisions
                       if d.site.path == p}
            if len(decided) == 1 and None not in next(iter(decided)):
                key = next(iter(decided))
                if key not in shared:
                    spec = next(d.spec for d in decisions if d.site.path == p)
                    shared[key] = LocattnBackend(spec_policy(spec, backend), backend=backend, inductor=inductor)
                backends[p] = shared[key]
                alone[p] = torch.compile(modules[p], backend=shared[key])
            else:
                handles.append(modules[p].register_forward_pre_hook(teacher_input(p), with_kwargs=True))
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    train_ids = {id(p) for p in train}
    for p in model.parameters():
        p.requires_grad_(id(p) in train_ids)
    model.eval()
    opt = torch.optim.Adam(train, lr=lr)
    whole = len(alone) < len(paths)  # some module runs inside the whole student
    student = torch.compile(model, backend=LocattnBackend(policy, backend=backend, inductor=inductor)) if whole \
        else None
    every = max(1, steps // 20)
    log.info("locattn graft: %d site(s) in %d module(s), %d trainable tensors (%s), %s inputs, %d steps",
             len(sites), len(paths), len(train), params, inputs, steps)
    t0 = time.perf_counter()
    done = 0
    limit = torch._dynamo.config.recompile_limit
    # modules of one class share their forward's compiled code; each may need its own entry (guards on the
    # module or the backend): never let Dynamo fall back to running one eagerly, i.e. dense
    torch._dynamo.config.recompile_limit = max(limit, len(alone) + 8)
    try:
        for step, sample in zip(range(steps), _cycle(samples)):
            a, kw = _as_call(sample, device)
            t_out.clear()
            s_out.clear()
            t_in.clear()
            with torch.no_grad():
                t_final = _first_tensor(teacher(*a, **kw))
            s_final = _first_tensor(student(*a, **kw)) if student is not None else None
            for p, mod in alone.items():
                s_out[p] = _first_tensor(mod(*t_in[p][0], **t_in[p][1]))
            if step == 0:
                for p in alone:
                    if not any(d.rewritten and not d.spec.is_dense for d in backends[p].decisions):
                        raise RuntimeError(f"graft: module {p!r} compiled on its own did not rewrite its attention "
                                           "site as decided in the whole model; use inputs='student'")
            missing = [p for p in paths if p not in s_out or p not in t_out]
            if missing:
                raise RuntimeError(f"graft: modules {missing} produced no tensor output this step")
            per_site = {p: F.mse_loss(s_out[p].float(), t_out[p].float()) for p in paths}
            loss = torch.stack(list(per_site.values())).mean()
            out_mse = None
            if output_weight:
                out_mse = F.mse_loss(s_final.float(), t_final.float())
                loss = loss + output_weight * out_mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step + 1
            rec = {"step": done, "loss": float(loss.detach()),
                   "sites": {p: float(v.detach()) for p, v in per_site.items()},
                   "output": None if out_mse is None else float(out_mse.detach()), "seconds": time.perf_counter() - t0}
            if history is not None:
                history.append(rec)
            if progress and (done == 1 or done % every == 0 or done == steps):
                print(f"locattn graft: step {done}/{steps} loss {rec['loss']:.4g} "
                      f"({rec['seconds']:.0f}s)", file=sys.stderr, flush=True)
    finally:
        torch._dynamo.config.recompile_limit = limit
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
        torch._dynamo.reset()
    if done < steps:
        log.warning("locattn graft: the samples ran out after %d of %d steps", done, steps)
    if save:
        os.makedirs(os.path.dirname(os.path.abspath(save)), exist_ok=True)
        torch.save(model.state_dict(), save)
        log.info("locattn graft: state dict saved to %s", save)
    return model


def save_history(history: list, path: str) -> None:
    """Write a :func:`graft` history (the loss curves) as JSON."""
    with open(path, "w") as f:
        json.dump(history, f, indent=1)
