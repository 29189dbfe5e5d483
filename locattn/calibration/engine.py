"""The calibration procedure, shared by ``locattn.calibrate`` and the backend's ``policy = "auto"``.

1. **Record**: one dense pass per sample through the tapped graphs (:mod:`.record`); on the fit samples each
   site scores its candidates on sampled query rows (:mod:`.scoring`); the outputs are kept as references.
2. **Cost**: each candidate's cost at each site's shape (:mod:`.cost`: measured, cached per machine).
3. **Search**: for a proxy error budget ``E`` the knapsack (:func:`.solver.solve`) picks a candidate per
   (site, head); the resulting policy runs end to end on the fit samples and ``metric`` is measured;
   :class:`.solver.BudgetSearch` moves ``E`` until the metric lands just under ``budget``.
4. **Validate**: the chosen policy runs on the held-out samples; when the metric exceeds the budget there, the
   proxy budget is searched again on the held-out samples (:meth:`Engine._resolve`: shrink, then bisect; at
   most ``resolves`` evaluations; the solver, not a rule of thumb, picks which heads get more keys); only if no
   re-solved choice meets the budget do the sites with the largest predicted error go back to dense (1, then
   2, 4, ... more at a time).

A budget that only dense attention meets gives the all-dense policy, saying so in its header.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..counters import bump, log
from ..passes.rewrite import decide
from ..policy import Policy
from . import cost as costmod
from .metrics import detach, relative_l2
from .record import CalibrationError, Session, SiteRecord
from .report import CalibrationReport, SiteResult, build_policy
from .solver import BudgetSearch, cheapest, solve


@dataclass
class Options:
    """Knobs of a calibration (``locattn.calibrate``'s keywords, the backend's ``auto`` options)."""

    budget: float = 0.02
    metric: Callable[[Any, Any], float] | None = None
    candidates: list | None = None
    progress: bool = True
    #: "time" (measured, cached per machine), "blocks" (the plan's block count) or "scores" (attention scores
    #: kept on the sampled rows: the FLOPs of an exact sparse kernel, whatever runs it)
    cost: str = "time"
    #: query rows scored per site call
    rows: int = 128
    #: the per-head error the solver adds up: "output" (each head's share of its site's relative squared output
    #: error) or "gradient" (Σ (g · Δo)² with g = d(metric)/d(site output) from one backward per fit sample;
    #: needs a metric with a nonzero gradient at the reference, e.g. perplexity_change; else "output" is used)
    proxy: str = "output"
    #: samples held out for validation (None: n // 4, at least 1 when there are 2 or more)
    holdout: int | None = None
    #: end-to-end evaluations of the search on the fit samples
    max_evals: int = 5
    #: held-out validation: end-to-end evaluations of re-solved choices (smaller proxy budgets) before whole
    #: sites go back to dense
    resolves: int = 4
    backend: str = ""
    resolution: int = 4096

    def check(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
            raise CalibrationError(f"locattn.calibrate: budget must be a finite number >= 0 (the largest allowed "
                                   f"metric; 0 = exact, all dense), got {b!r}")
        if self.cost not in costmod.COST_MODES:
            raise CalibrationError(f"locattn.calibrate: cost must be one of {costmod.COST_MODES}, got {self.cost!r}")
        if self.metric is not None and not callable(self.metric):
            raise CalibrationError(f"locattn.calibrate: metric must be callable(reference, output) -> float, "
                                   f"got {self.metric!r}")
        if self.proxy not in ("output", "gradient"):
            raise CalibrationError(f"locattn.calibrate: proxy must be 'output' or 'gradient', got {self.proxy!r}")
        if self.rows < 1 or self.max_evals < 1:
            raise CalibrationError("locattn.calibrate: rows and max_evals must be >= 1")
        if isinstance(self.resolves, bool) or not isinstance(self.resolves, int) or self.resolves < 0:
            raise CalibrationError(f"locattn.calibrate: resolves must be an int >= 0, got {self.resolves!r}")


@dataclass
class Calibration:
    """The result: the policy and what was measured (``report.summary()``)."""

    policy: Policy
    report: CalibrationReport


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"locattn calibrate: {desc}", disable=not enabled, leave=False,
                dynamic_ncols=True)


def versions() -> str:
    import platform

    from .. import __version__

    return (f"locattn {__version__}, torch {torch.__version__}, {platform.machine()} with "
            f"{torch.get_num_threads()} threads")


class _Phases:
    """``with clock("name"):`` records (wall s, process CPU s) of the block into ``phases[name]``."""

    def __init__(self, phases: dict):
        self.phases = phases

    def __call__(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def run():
            w, c = time.perf_counter(), time.process_time()
            try:
                yield
            finally:
                self.phases[name] = (time.perf_counter() - w, time.process_time() - c)

        return run()


class Engine:
    """Runs steps 1-4 on ``n`` samples: ``run(i)`` runs sample ``i`` through the tapped graphs of ``session``."""

    def __init__(self, session: Session, run: Callable[[int], Any], n: int, opts: Options, model: str,
                 sample_shapes: list[str]):
        opts.check()
        if n < 1:
            raise CalibrationError("locattn.calibrate: no samples (pass a list of argument tuples)")
        self.session, self.run, self.n, self.opts = session, run, n, opts
        self.metric = opts.metric or relative_l2
        self.model, self.sample_shapes = model, sample_shapes
        hold = opts.holdout if opts.holdout is not None else (max(1, n // 4) if n >= 2 else 0)
        if not 0 <= hold < n:
            raise CalibrationError(f"locattn.calibrate: holdout={hold} leaves no sample to fit ({n} samples)")
        self.fit = list(range(n - hold))
        self.hold = list(range(n - hold, n))
        self.refs: list[Any] = [None] * n
        self.sites: list[SiteRecord] = []

    # -- helpers ---------------------------------------------------------------------------------------------
    def _run(self, i: int):
        self.session.sample = i
        try:
            return self.run(i)
        except CalibrationError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the sample named
            raise CalibrationError(f"locattn.calibrate: sample {i} failed to run: {type(e).__name__}: {e}") from e

    def _metric(self, i: int, out) -> float:
        try:
            m = float(self.metric(self.refs[i], out))
        except Exception as e:  # noqa: BLE001
            raise CalibrationError(f"locattn.calibrate: metric failed on sample {i}: {type(e).__name__}: {e}") from e
        if not math.isfinite(m):
            raise CalibrationError(f"locattn.calibrate: metric returned {m} on sample {i} (the reference output "
                                   f"itself may hold NaN/inf); a metric must return a finite float")
        return m

    def evaluate(self, policy: Policy, idx: list[int], bar=None) -> float:
        """Mean metric of ``policy`` over samples ``idx`` (each against its dense reference)."""
        self.session.specs = {rec.path: decide(rec.site, policy).spec.to_json() for rec in self.sites}
        ms = []
        try:
            with torch.no_grad():
                for i in idx:
                    ms.append(self._metric(i, self._run(i)))
                    if bar is not None:
                        bar.update(1)
        finally:
            self.session.specs = {}
        return sum(ms) / len(ms)

    # -- steps -----------------------------------------------------------------------------------------------
    def record(self) -> None:
        bar = _progress(self.n, "dense passes (recording)", self.opts.progress)
        with bar:
            for i in range(self.n):
                self.session.mode = "score" if i in self.fit else "shapes"
                grad = self.opts.proxy == "gradient" and i in self.fit
                self.session.gradients = grad
                try:
                    with torch.set_grad_enabled(grad):
                        out = self._run(i)
                    self.refs[i] = detach(out)
                    if grad:
                        self._gradients(i, out)
                finally:
                    self.session.mode, self.session.gradients, self.session.pending = "off", False, []
                bar.update(1)
        self._collect_sites()

    def _gradients(self, i: int, out) -> None:
        """d(metric)/d(site output) for every site call of sample ``i`` (the metric at the reference itself),
        then the pending scores; a metric without a usable gradient there leaves the gradient proxy unset."""
        zs = [z for _, z in self.session.pending]
        try:
            obj = self.metric(self.refs[i], out)
            ok = isinstance(obj, torch.Tensor) and obj.requires_grad
            grads = torch.autograd.grad(obj, zs, allow_unused=True) if ok and zs else None
        except RuntimeError as e:
            log.info("locattn calibrate: no gradient of the metric (%s); output proxy", e)
            grads = None
        if grads is not None and not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
            grads = None
        self.grad_ok = getattr(self, "grad_ok", True) and grads is not None
        self.session.score_pending(list(grads) if grads is not None else None)

    def _collect_sites(self) -> None:
        self.sites = [r for r in self.session.sites.values() if r.stats is not None]
        if not self.sites:
            left = "; ".join(f"{p or '<root>'}: {why}" for p, why in self.session.left_alone)
            raise CalibrationError("locattn.calibrate: no attention site to calibrate in this model"
                                   + (f" (left alone: {left})" if left else " (none found in its graphs)"))

    def measure_costs(self) -> None:
        mode = self.opts.cost
        jobs = []
        for rec in self.sites:
            if mode == "time" and not costmod.can_time(rec.device):
                mode = "blocks"
        caches: dict[str, costmod.CostCache] = {}
        for rec in self.sites:
            jobs += [(rec, c) for c in range(len(rec.candidates))]
            rec.costs = [math.inf] * len(rec.candidates)
        bar = _progress(len(jobs), f"cost of {len(jobs)} (site, candidate) pairs", self.opts.progress)
        inputs: dict[tuple, tuple] = {}
        with bar:
            for rec, c in jobs:
                cand = rec.candidates[c]
                if mode == "scores":   # the attention scores the candidate computes (an exact kernel's FLOPs)
                    rec.costs[c] = float(rec.stats.kept[:, c].sum())
                    bar.update(1)
                    continue
                if not cand.static:    # content-dependent: on the site's recorded tensors, not cached
                    rec.costs[c] = self._dynamic_cost(rec, cand, mode)
                    bar.update(1)
                    continue
                if mode == "blocks":
                    rec.costs[c] = costmod.block_cost(cand, rec.site.s_q, rec.site.s_k, rec.site.is_causal)
                    bar.update(1)
                    continue
                cache = caches.setdefault(str(rec.device), costmod.CostCache(rec.device))
                shapes = (rec.site.q_shape, rec.site.k_shape, rec.site.v_shape)
                if (shapes, rec.dtype, rec.device) not in inputs:
                    inputs[shapes, rec.dtype, rec.device] = costmod.make_inputs(*shapes, rec.dtype, rec.device)
                q, k, v = inputs[shapes, rec.dtype, rec.device]
                kind = "causal" if rec.mask_causal else ("mask" if rec.example_mask is not None else "none")
                key = costmod._key(cand, q, k, v, rec.example_mask, rec.example_bias, rec.site.is_causal, kind)
                if key not in cache.data:
                    try:
                        cache.data[key] = costmod.time_candidate(cand, q, k, v, rec.example_mask, rec.example_bias,
                                                                 rec.scale, rec.site.is_causal, self.opts.backend)
                    except Exception as e:  # noqa: BLE001 - a candidate that cannot run is not a choice
                        log.warning("locattn.calibrate: %s at %s cannot run (%s); dropped", cand.label,
                                    rec.path or "<root>", e)
                        cache.data[key] = math.inf
                    bump("calibration", "candidates timed")
                rec.costs[c] = cache.data[key]
                bar.update(1)
        for cache in caches.values():
            cache.save()
        self.cost_mode = mode
        for rec in self.sites:
            if not math.isfinite(rec.costs[0]):
                raise CalibrationError(f"locattn.calibrate: dense attention at {rec.path!r} could not be timed")

    def _dynamic_cost(self, rec: SiteRecord, cand, mode: str) -> float:
        """A content-dependent candidate's cost at ``rec``: measured on the site's recorded q / k / v (its first
        scored call) — the op's time, or its selection's block count."""
        q, k, v = rec.example_qkv
        try:
            if mode == "blocks":
                return costmod.dynamic_block_cost(cand, q, k, v, rec.scale, rec.site.is_causal)
            bump("calibration", "candidates timed")
            return costmod.time_candidate(cand, q, k, v, rec.example_mask, rec.example_bias, rec.scale,
                                          rec.site.is_causal, self.opts.backend)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is not a choice
            log.warning("locattn.calibrate: %s at %s cannot run (%s); dropped", cand.label, rec.path or "<root>", e)
            return math.inf

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor, list[tuple[SiteRecord, int]]]:
        width = max(len(r.candidates) for r in self.sites)
        items = [(rec, h) for rec in self.sites for h in range(rec.heads)]
        cost = torch.full((len(items), width), math.inf, dtype=torch.float64)
        err = torch.zeros(len(items), width, dtype=torch.float64)
        i = 0
        use_grad = self.opts.proxy == "gradient" and getattr(self, "grad_ok", False)
        self.proxy_used = "gradient" if use_grad else "output"
        for rec in self.sites:
            e = rec.stats.grad_error() if use_grad else rec.stats.error()
            n = len(rec.candidates)
            cost[i:i + rec.heads, :n] = torch.stack([costmod.head_costs(cand, rec.costs[j], rec.stats.kept[:, j])
                                                      for j, cand in enumerate(rec.candidates)], 1)
            err[i:i + rec.heads, :n] = e
            i += rec.heads
        return cost, err, items

    def _choice(self, col: torch.Tensor, items) -> dict[str, torch.Tensor]:
        out: dict[str, list[int]] = {}
        for (rec, _), c in zip(items, col.tolist()):
            out.setdefault(rec.path, []).append(c)
        return {p: torch.tensor(v) for p, v in out.items()}

    def calibrate(self, recorded: bool = False) -> Calibration:
        """Steps 1-4; ``recorded``: the dense passes already ran (the ``auto`` backend records during the
        model's own first calls)."""
        t0 = time.perf_counter()
        opts = self.opts
        phases: dict[str, tuple[float, float]] = {}
        clock = _Phases(phases)
        with clock("record"):
            if recorded:
                self._collect_sites()
            else:
                self.record()
        with clock("cost"):
            self.measure_costs()
        cost, err, items = self._matrices()
        report = CalibrationReport(self.model, self.sample_shapes, len(self.fit), len(self.hold), opts.budget,
                                   getattr(self.metric, "__name__", type(self.metric).__name__), self.cost_mode,
                                   versions=versions())
        report.phases = phases
        report.proxy = self.proxy_used
        if self.opts.proxy != self.proxy_used:
            report.note = "gradient proxy unavailable (the metric has no nonzero gradient at the reference): " \
                          "used the output error"
        choice = torch.zeros(len(items), dtype=torch.long)
        if opts.budget == 0:
            report.note = "budget 0 allows no error: every site stays dense"
        else:
            with clock("search"):
                choice, e = self._search(cost, err, items, report)
            with clock("validate"):
                choice = self._validate(choice, e, cost, err, items, report)
        self._fill_report(report, choice, cost, items)
        report.wall_s = time.perf_counter() - t0
        policy = build_policy(self.sites, self._choice(choice, items), header=report.header())
        log.info("locattn calibrate:\n%s", report.summary())
        bump("calibration", "calibrated")
        return Calibration(policy, report)

    def _search(self, cost, err, items, report) -> tuple[torch.Tensor, float | None]:
        """The choice (candidate per item) whose fit-sample metric meets the budget at the largest proxy budget
        ``E`` tried, and that ``E`` (all dense and None when none does)."""
        opts = self.opts
        cheap = cheapest(cost)
        e_max = float(err.gather(1, cheap[:, None]).sum())
        search = BudgetSearch(opts.budget, e_max, max_evals=opts.max_evals)
        best: tuple[float, torch.Tensor] | None = None
        bar = _progress(opts.max_evals * len(self.fit), "search on the fit samples", opts.progress)
        measured: dict[tuple, float] = {}   # a choice measured once (several E can give the same choice)
        with bar:
            while not search.done():
                e = search.next()
                col = cheap if e >= e_max else solve(cost, err, e, opts.resolution)
                key = tuple(col.tolist())
                if key not in measured:
                    dense = not bool((col != 0).any())   # exact by construction: no pass needed
                    measured[key] = 0.0 if dense else \
                        self.evaluate(build_policy(self.sites, self._choice(col, items)), self.fit, bar)
                m = measured[key]
                search.tell(e, m)
                report.evaluations.append(("fit", e, m))
                log.info("locattn calibrate: proxy error %.3e -> metric %.4g on the fit samples", e, m)
                if m <= opts.budget and (best is None or e > best[0]):
                    best = (e, col)
                if e_max == 0:
                    break
        if best is not None and not bool((best[1] != 0).any()):
            best = None
        if best is None:
            report.met = False
            report.note = (f"budget {opts.budget:g} could not be met with any sparse candidate on the fit samples "
                           f"(smallest measured: {min(m for _, _, m in report.evaluations):.4g}): every site stays "
                           f"dense")
            return torch.zeros(len(items), dtype=torch.long), None
        report.fit_error = next(m for w, e, m in report.evaluations if e == best[0])
        return best[1], best[0]

    def _validate(self, col: torch.Tensor, e: float | None, cost, err, items, report) -> torch.Tensor:
        """``col`` (chosen by the search at proxy budget ``e``) checked on the held-out samples, re-solved or
        backed off until the metric meets the budget there."""
        if not bool((col != 0).any()):
            return col
        idx = self.hold or self.fit
        if not self.hold:
            report.holdout_error = report.fit_error
            return col
        col = col.clone()
        bar = _progress(0, "validation on held-out samples", self.opts.progress)
        with bar:
            m = self._held_out(col, e, idx, items, report, bar)
            if m > self.opts.budget and e is not None and self.opts.resolves:
                col, m = self._resolve(col, e, m, cost, err, idx, items, report, bar)
            step = 1
            while m > self.opts.budget and bool((col != 0).any()):
                # back off the sites with the largest predicted error, 1, then 2, 4, ... at a time
                per_site: dict[str, float] = {}
                for (rec, _), er, c in zip(items, err.gather(1, col[:, None]).squeeze(1).tolist(), col.tolist()):
                    if c != 0:
                        per_site[rec.path] = per_site.get(rec.path, 0.0) + er
                worst = sorted(per_site, key=lambda p: -per_site[p])
                for p in worst[:step]:
                    for j, (rec, _) in enumerate(items):
                        if rec.path == p:
                            col[j] = 0
                    report.backed_off.append(p)
                log.info("locattn calibrate: held-out metric %.4g > budget %.4g: %d site(s) back to dense", m,
                         self.opts.budget, min(step, len(worst)))
                step *= 2
                m = self._held_out(col, None, idx, items, report, bar)
        if report.holdout_error is not None and report.holdout_error > self.opts.budget:
            report.met = False
            report.note = (f"budget {self.opts.budget:g} cannot be met even with every site dense (measured "
                           f"{report.holdout_error:.4g}): every site stays dense")
        elif not bool((col != 0).any()):
            report.note = f"budget {self.opts.budget:g} was met on held-out samples only with every site dense"
        return col

    def _held_out(self, col, e, idx, items, report, bar) -> float:
        """The held-out metric of choice ``col`` (made at proxy budget ``e``; None: not a solver's choice)."""
        bar.total += len(idx)
        m = self.evaluate(build_policy(self.sites, self._choice(col, items)), idx, bar)
        report.evaluations.append(("holdout", float("nan") if e is None else e, m))
        report.holdout_error = m
        return m

    def _resolve(self, col, e_bad, m_bad, cost, err, idx, items, report, bar):
        """Search the proxy budget on the held-out samples: the search's choice ``col`` (at ``e_bad``) measured
        ``m_bad`` > budget there. Shrink E by ``rho = 0.9 budget / m`` (squared, then to the 4th, ... after each
        further miss) until a choice meets the budget, then bisect (geometrically) between the largest feasible
        and the smallest infeasible E; at most ``opts.resolves`` evaluations. Returns the best feasible choice
        and its metric, else the last one tried (the caller backs off whole sites from there)."""
        budget = self.opts.budget
        best = None                         # (e, col, m) feasible, largest e
        last = (col, m_bad)
        e_cur, m_cur, misses = e_bad, m_bad, 0
        for _ in range(self.opts.resolves):
            if best is None:
                rho = min(0.9, 0.9 * budget / m_cur) if math.isfinite(m_cur) and m_cur > 0 else 0.5
                e_try = e_cur * rho ** (2 ** misses)
            else:
                if e_bad / best[0] < 1.5:
                    break                   # bracket tight enough
                e_try = math.sqrt(best[0] * e_bad)
            new = solve(cost, err, e_try, self.opts.resolution)
            if not bool((new != 0).any()):
                break                       # all dense: leave that verdict to the back-off
            m = self._held_out(new, e_try, idx, items, report, bar)
            report.resolved.append((e_try, m))
            log.info("locattn calibrate: held-out: re-solved at proxy error %.3e -> metric %.4g", e_try, m)
            if m <= budget:
                if best is None or e_try > best[0]:
                    best = (e_try, new, m)
            else:
                e_bad = min(e_bad, e_try)
                e_cur, m_cur, misses = e_try, m, misses + 1
                last = (new, m)
        if best is not None:
            report.holdout_error = best[2]
            return best[1].clone(), best[2]
        report.holdout_error = last[1]
        return last[0].clone(), last[1]

    def _fill_report(self, report: CalibrationReport, col: torch.Tensor, cost, items) -> None:
        choice = self._choice(col, items)
        kept_num = kept_den = 0.0
        t_dense = t_chosen = 0.0
        i = 0
        for rec in self.sites:
            ch = choice[rec.path]
            h = torch.arange(rec.heads)
            per_head = cost[i:i + rec.heads].gather(1, ch[:, None]).squeeze(1)   # each head's share of the cost
            i += rec.heads
            e = rec.stats.error()[h, ch]
            kept = rec.stats.kept_fraction()[h, ch]
            allowed = rec.stats.allowed
            kept_num += float((kept * allowed).sum())
            kept_den += float(allowed.sum())
            c = torch.tensor(rec.costs, dtype=torch.float64)
            t_dense += float(c[0])
            t_chosen += float(per_head.sum())
            report.sites.append(SiteResult(rec.path, rec.heads, [rec.candidates[i].label for i in ch.tolist()],
                                           math.sqrt(float(e.sum())), float(rec.stats.mass_kept()[h, ch].mean()),
                                           float(kept.mean()), float(c[0]), float(per_head.sum()),
                                           rec.path in report.backed_off))
        report.scores_kept = kept_num / kept_den if kept_den else 1.0
        report.time_ratio = t_chosen / t_dense if t_dense else 1.0
