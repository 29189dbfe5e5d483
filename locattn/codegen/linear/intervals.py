"""The hybrid's ``in_pattern`` sums for 1-D patterns by prefix sums: O(S (m Dv + C (m + Dv))), no plan walk.

On a 1-D grid every pattern gives query ``r`` one interval of keys ``[lo_r, hi_r]`` in u-space (dilation groups
made contiguous, :mod:`locattn.patterns.base`; causal clips ``hi_r`` to ``r``), so with the prefix sums
``E_r(t) = sum_{u < t} kappa_ru v_u``::

    sum_{u in [lo_r, hi_r]} kappa_ru v_u = E_r(hi_r + 1) - E_r(lo_r)          (0 if the interval is empty)

Glossary
--------
C        chunk length: keys in u-order are cut into chunks; ``H[c] = sum_{u < cC} fk_u v_u^T`` [m, Dv] and
         ``Z[c] = sum_{u < cC} fk_u`` (c = 0 .. n_chunks: the last is the total)
block    C consecutive query rows (u-order)
c0       per block and evaluation point, the chunk of its smallest ``t`` (``(t - shift) // C``, shift 1 for
         the upper end so a window ``[r - w, r + w]`` with ``w % C == 0`` starts both ends on a chunk boundary)
W        chunks each block reads past ``c0`` (the same for every block: the largest span)
ragged   ``E_r(t) = fq_r . H[c0] + sum_{u in [c0 C, t)} kappa_ru v_u``: one state per block plus a pairwise
         product over ``W C`` keys under the mask ``u < t``

Sinks outside a query's interval are added pairwise (``n_sinks`` keys per query). Layouts with prefix / suffix
global tokens take the plan walk instead (:meth:`ChunkedSums.in_pattern`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...patterns.base import Layout, Pattern, dilation_groups, u_to_coord


def supported(pattern: Pattern, layout: Layout) -> bool:
    return pattern.local and len(layout.grid) == 1 and not layout.prefix and not layout.suffix


def outside_supported(pattern: Pattern, layout: Layout, causal: bool, chunk: int) -> bool:
    """``A \\ P`` directly (:meth:`IntervalSums.forward` with ``outside``): non-causal (A is every key, one state
    ``H_all``) and no empty interval (the per-block state cannot be zeroed row by row)."""
    return not causal and supported(pattern, layout) and not bool(tables(pattern, layout, False, chunk).empty.any())


@dataclass(frozen=True, eq=False)
class Run:
    """Blocks ``b0 .. b1 - 1`` whose ``c0`` is ``c_start + step * i``: their keys (and states) are one strided
    view (step 0: one window for all). ``mask`` [nr, C, W C]: key ``u < t`` of each row."""

    b0: int
    b1: int
    c_start: int
    step: int
    mask: torch.Tensor                 # bool [nr or 1, C, W C]

    def mask_on(self, t: torch.Tensor) -> torch.Tensor:
        """The mask as 0 / 1 in ``t``'s dtype on its device (cached: a float multiply, no conversion per use)."""
        key = (t.device, t.dtype)
        cache = self.__dict__.setdefault("_masks", {})
        if key not in cache:
            cache[key] = self.mask.to(device=t.device, dtype=t.dtype)
        return cache[key]


@dataclass(frozen=True, eq=False)
class End:
    """One evaluation point per row: ``t`` [n] (u-order), block chunks ``c0`` [nb], span ``W`` and the runs."""

    t: torch.Tensor
    c0: torch.Tensor
    width: int
    runs: tuple[Run, ...]


@dataclass(frozen=True, eq=False)
class Tables:
    n: int
    chunk: int
    tok: torch.Tensor | None        # [n] token of u-position (None: identity, no dilation)
    empty: torch.Tensor             # [n] bool: the row's interval is empty
    hi: End                         # t = hi + 1
    lo: End                         # t = lo
    sink_u: torch.Tensor            # [n_sinks] u-coordinate of each sink key (token < sinks)
    lo_u: torch.Tensor              # [n] interval bounds (u-order rows), for the sinks' test
    hi_u: torch.Tensor
    ends_at_query: bool             # causal, undilated, every interval ends at its query: A minus P = [0, lo)


def _end(t: torch.Tensor, shift: int, c: int, n_chunks: int) -> End:
    n = t.numel()
    nb = -(-n // c)
    cr = ((t - shift).div(c, rounding_mode="floor")).clamp(0, n_chunks)
    pad = torch.cat([cr, cr[-1:].expand(nb * c - n)]) if nb * c > n else cr
    blocks = pad.view(nb, c)
    c0 = blocks.amin(1)
    width = int((blocks.amax(1) - c0).max()) + 1
    tp = torch.cat([t, t[-1:].expand(nb * c - n)]) if nb * c > n else t
    cols = torch.arange(width * c)
    runs, cl, b0 = [], c0.tolist(), 0
    while b0 < nb:  # maximal arithmetic progressions of c0 with a step >= 0
        step = cl[b0 + 1] - cl[b0] if b0 + 1 < nb else 0
        if step < 0:
            step = 0
        b1 = b0 + 1
        while b1 < nb and cl[b1] - cl[b1 - 1] == step:
            b1 += 1
        u = c0[b0:b1, None, None] * c + cols[None, None, :]
        mask = u < tp[b0 * c:b1 * c].view(b1 - b0, c, 1)
        if bool((mask == mask[:1]).all()):  # e.g. every interior block of a sliding window: one triangle
            mask = mask[:1]
        runs.append(Run(b0, b1, cl[b0], step, mask))
        b0 = b1
    return End(t, c0, width, tuple(runs))


@functools.lru_cache(maxsize=64)
def tables(pattern: Pattern, layout: Layout, causal: bool, chunk: int) -> Tables:
    """O(S) host tables of a 1-D pattern (cached)."""
    n = layout.grid[0]
    d = pattern.dilation_of(0, 1)
    u = torch.arange(n)
    coord = u_to_coord(u, n, d)
    lo, hi = pattern.axis_bounds(0, (n,), coord)
    if causal:  # keys of an interval share the query's dilation group, where u-order is token order
        hi = torch.minimum(hi, u)
    empty = hi < lo
    n_chunks = -(-n // chunk)
    hi_end = _end(torch.where(empty, lo, hi + 1), 1, chunk, n_chunks)
    lo_end = _end(lo, 0, chunk, n_chunks)
    n_sink = min(layout.sinks, n)
    sink_u = dilation_groups(torch.arange(n_sink), n, d)[0]
    return Tables(n, chunk, coord if d > 1 else None, empty, hi_end, lo_end, sink_u, lo, hi,
                  causal and d == 1 and bool((hi == u).all()))


#: group length of :func:`prefix_sum_`'s two-level scan
SCAN_GROUP = 16


def prefix_sum_(x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    """In-place inclusive prefix sum along ``dim`` by vectorised adds of whole slices: ``torch.cumsum`` along a
    middle dimension of a [.., n_chunks, m, Dv] state tensor is ~30x slower on CPU. Two levels (groups of
    ``SCAN_GROUP``: a scan inside every group at once, then the groups' carries) so a long scan costs
    ``G + n / G`` adds, not ``n`` (each ~10 us of dispatch at these sizes)."""
    n, g = x.shape[dim], SCAN_GROUP
    if n <= 2 * g:
        order = range(n - 2, -1, -1) if reverse else range(1, n)
        for i in order:
            x.select(dim, i).add_(x.select(dim, i + 1 if reverse else i - 1))
        return x
    ng = n // g
    nf = ng * g
    if not reverse:
        body = x.narrow(dim, 0, nf).unflatten(dim, (ng, g))            # [.., ng, G, ..] (a view)
        for i in range(1, g):
            body.select(dim + 1, i).add_(body.select(dim + 1, i - 1))
        for j in range(1, ng):
            body.select(dim, j).add_(body.select(dim, j - 1).narrow(dim, g - 1, 1))
        for i in range(nf, n):
            x.select(dim, i).add_(x.select(dim, i - 1))
        return x
    body = x.narrow(dim, n - nf, nf).unflatten(dim, (ng, g))
    for i in range(g - 2, -1, -1):
        body.select(dim + 1, i).add_(body.select(dim + 1, i + 1))
    for j in range(ng - 2, -1, -1):
        body.select(dim, j).add_(body.select(dim, j + 1).narrow(dim, 0, 1))
    for i in range(n - nf - 1, -1, -1):
        x.select(dim, i).add_(x.select(dim, i + 1))
    return x


def _grouped(x: torch.Tensor, hk: int) -> torch.Tensor:
    return x.view(x.shape[0], hk, x.shape[1] // hk, *x.shape[2:])


def _run_view(x: torch.Tensor, dim: int, start: int, step: int, count: int, length: int = 1) -> torch.Tensor:
    """``x`` with dim ``dim`` replaced by ``count`` windows ``[start + step i, start + step i + length)`` (a view;
    windows overlap when ``step < length``): shape ``[.., count, length, ..]``, or ``[.., count, ..]`` for
    ``length == 1``."""
    st = list(x.stride())
    sh = list(x.shape)
    off = x.storage_offset() + start * st[dim]
    if length == 1:
        sh[dim], st[dim] = count, step * st[dim]
    else:
        sh[dim:dim + 1], st[dim:dim + 1] = [count, length], [step * st[dim], st[dim]]
    return x.as_strided(sh, st, off)


class IntervalSums:
    """``in_pattern`` sums and their backward for :func:`supported` calls (u-order inside, token order out)."""

    def __init__(self, chunk: int):
        self.chunk = chunk

    # -- shared by both ends -------------------------------------------------------------------------------
    def _keys(self, tab: Tables, fk, v, ends: tuple[End, ...]):
        """Keys (contiguous) padded with zeros to whole chunks and as far as the runs of ``ends`` read (no copy
        when neither pads: a window of a sequence of whole chunks stays inside it) and the states ``H``
        [B, Hk, n_chunks + 1, m, Dv], ``Z`` [B, Hk, n_chunks + 1, m] (``H[0] = 0``, ``H[n_chunks]`` = all keys)."""
        c, n = self.chunk, tab.n
        b, hk, _, m = fk.shape
        dv = v.shape[-1]
        n_chunks = -(-n // c)
        reach = max((r.c_start + r.step * (r.b1 - r.b0 - 1) + e.width) * c for e in ends for r in e.runs)
        rows = max(n_chunks * c, reach)
        fkp = torch.cat([fk, fk.new_zeros(b, hk, rows - n, m)], 2) if rows > n else fk.contiguous()
        vp = torch.cat([v, v.new_zeros(b, hk, rows - n, dv)], 2) if rows > n else v.contiguous()
        st = fkp[:, :, :n_chunks * c].view(b, hk, n_chunks, c, m)
        h = fk.new_zeros(b, hk, n_chunks + 1, m, dv)
        torch.matmul(st.transpose(-2, -1), vp[:, :, :n_chunks * c].view(b, hk, n_chunks, c, dv), out=h[:, :, 1:])
        z = fk.new_zeros(b, hk, n_chunks + 1, m)
        torch.sum(st, -2, out=z[:, :, 1:])
        prefix_sum_(h, 2)
        prefix_sum_(z, 2)
        return fkp, vp, h, z

    def _views(self, run: Run, width: int, fq, keys, b: int, h: int, hk: int):
        """One head's operands for a run: queries [nr, C, m] (step 0: [nr C, m]), keys [nr, W C, m] / values /
        states [nr, m, Dv] / [nr, m] as strided views (step 0: one window [W C, m] and one state)."""
        fkp, vp, hs, zs = keys
        c = self.chunk
        nr = run.b1 - run.b0
        q = fq[b, h, run.b0 * c:run.b1 * c]
        k_, v_, h_, z_ = fkp[b, hk], vp[b, hk], hs[b, hk], zs[b, hk]
        r0 = run.c_start * c
        if run.step == 0:
            return q, k_[r0:r0 + width * c], v_[r0:r0 + width * c], h_[run.c_start], z_[run.c_start]
        m, dv = k_.shape[-1], v_.shape[-1]
        st = run.step
        kw = k_.as_strided((nr, width * c, m), (st * c * m, m, 1), k_.storage_offset() + r0 * m)
        vw = v_.as_strided((nr, width * c, dv), (st * c * dv, dv, 1), v_.storage_offset() + r0 * dv)
        hw = h_.as_strided((nr, m, dv), (st * m * dv, dv, 1), h_.storage_offset() + run.c_start * m * dv)
        zw = z_.as_strided((nr, m, 1), (st * m, 1, 1), z_.storage_offset() + run.c_start * m)
        return q.view(nr, c, m), kw, vw, hw, zw

    def _eval(self, tab: Tables, end: End, fq, keys, acc=None, alpha: float = 1.0):
        """``(num, den)`` of ``E_r(t_r)`` for every row (padded to whole blocks); with ``acc = (num, den)``: only
        the ragged part (no state term), times ``alpha``, added into ``acc`` in place."""
        c = self.chunk
        b_, hq, rows, m = fq.shape
        hk = keys[0].shape[1]
        rep = hq // hk
        dv = keys[1].shape[-1]
        if acc is None:
            num = fq.new_empty(b_, hq, rows, dv)
            den = fq.new_empty(b_, hq, rows)
        else:
            num, den = acc
        for run in end.runs:
            mask = run.mask_on(fq)
            nr = run.b1 - run.b0
            rs = slice(run.b0 * c, run.b1 * c)
            for b in range(b_):
                for h in range(hq):
                    q, k, v, hh, zz = self._views(run, end.width, fq, keys, b, h, h // rep)
                    if run.step == 0:
                        kap = (q @ k.T).view(nr, c, -1).mul_(mask).view(nr * c, -1)
                        if acc is None:
                            torch.addmm(kap @ v, q, hh, out=num[b, h, rs])
                            torch.add(kap.sum(-1), q @ zz, out=den[b, h, rs])
                        else:
                            num[b, h, rs].addmm_(kap, v, alpha=alpha)
                            den[b, h, rs].add_(kap.sum(-1), alpha=alpha)
                    else:
                        kap = torch.bmm(q, k.transpose(1, 2)).mul_(mask)
                        if acc is None:
                            num[b, h, rs] = torch.baddbmm(torch.bmm(kap, v), q, hh).view(-1, dv)
                            den[b, h, rs] = (torch.bmm(q, zz)[..., 0] + kap.sum(-1)).view(-1)
                        else:
                            num[b, h, rs].view(nr, c, dv).baddbmm_(kap, v, alpha=alpha)
                            den[b, h, rs].add_(kap.sum(-1).view(-1), alpha=alpha)
        return num, den

    def _eval_backward(self, tab: Tables, end: End, fq, keys, gn, gd, dfq, dfk, dv, dh, dz, states: bool = True):
        """Adds the gradients of ``sum_r gn_r . num_r + gd_r den_r`` at this end into dfq / dfk / dv (padded
        rows) and the states' gradients into ``dh`` / ``dz`` [B, Hk, n_chunks + 1, ...] (``states=False``: the
        ragged part's alone, as :meth:`_eval` with ``acc`` computes it)."""
        c = self.chunk
        b_, hq, rows, m = fq.shape
        hk = keys[0].shape[1]
        rep = hq // hk
        d_v = keys[1].shape[-1]
        for run in end.runs:
            mask = run.mask_on(fq)
            nr = run.b1 - run.b0
            rs = slice(run.b0 * c, run.b1 * c)
            r0, span = run.c_start * c, end.width * c
            kidx = None
            if run.step:
                kidx = (r0 + run.step * c * torch.arange(nr, device=fq.device)[:, None]
                        + torch.arange(span, device=fq.device)[None, :]).flatten()
                cidx = run.c_start + run.step * torch.arange(nr, device=fq.device)
            for b in range(b_):
                for h in range(hq):
                    kh = h // rep
                    q, k, v, hh, zz = self._views(run, end.width, fq, keys, b, h, kh)
                    g, gz = gn[b, h, rs], gd[b, h, rs]
                    if run.step == 0:
                        kap = (q @ k.T).view(nr, c, -1).mul_(mask).view(nr * c, -1)
                        dk_ = torch.addmm(gz[:, None], g, v.T).view(nr, c, -1).mul_(mask).view(nr * c, -1)
                        if states:
                            dfq[b, h, rs] += torch.addmm(dk_ @ k, g, hh.T).addcmul_(gz[:, None], zz[None, :])
                            dh[b, kh, run.c_start] += q.T @ g
                            dz[b, kh, run.c_start] += q.T @ gz
                        else:
                            dfq[b, h, rs].addmm_(dk_, k)
                        dfk[b, kh, r0:r0 + span].addmm_(dk_.T, q)
                        dv[b, kh, r0:r0 + span].addmm_(kap.T, g)
                    else:
                        g3, gz3 = g.view(nr, c, d_v), gz.view(nr, c, 1)
                        kap = torch.bmm(q, k.transpose(1, 2)).mul_(mask)
                        dk_ = torch.baddbmm(gz3, g3, v.transpose(1, 2)).mul_(mask)
                        if states:
                            gq = torch.baddbmm(torch.bmm(dk_, k), g3, hh.transpose(1, 2))
                            dfq[b, h, rs] += gq.add_(gz3 * zz.transpose(1, 2)).view(-1, m)
                            dh[b, kh].index_add_(0, cidx, torch.bmm(q.transpose(1, 2), g3))
                            dz[b, kh].index_add_(0, cidx, torch.bmm(q.transpose(1, 2), gz3)[..., 0])
                        else:
                            dfq[b, h, rs].view(nr, c, m).baddbmm_(dk_, k)
                        if run.step >= end.width:  # disjoint key windows: accumulate in place
                            _run_view(dfk[b, kh], 0, r0, run.step * c, nr, span).baddbmm_(dk_.transpose(1, 2), q)
                            _run_view(dv[b, kh], 0, r0, run.step * c, nr, span).baddbmm_(kap.transpose(1, 2), g3)
                        else:
                            dfk[b, kh].index_add_(0, kidx, torch.bmm(dk_.transpose(1, 2), q).view(-1, m))
                            dv[b, kh].index_add_(0, kidx, torch.bmm(kap.transpose(1, 2), g3).view(-1, d_v))

    def _states_backward(self, tab: Tables, keys, dh, dz, dfk, dv):
        """``H[c] = sum_{u < cC} fk_u v_u^T``: a key in chunk j gets ``G[j] = sum_{c > j} dH[c]``."""
        c, n = self.chunk, tab.n
        fkp, vp = keys[0], keys[1]
        b_, hk, _, m = fkp.shape
        d_v = vp.shape[-1]
        n_chunks = -(-n // c)
        prefix_sum_(dh, 2, reverse=True)
        prefix_sum_(dz, 2, reverse=True)
        g_h, g_z = dh[:, :, 1:], dz[:, :, 1:]
        fkc = fkp[:, :, :n_chunks * c].view(b_, hk, n_chunks, c, m)
        vc = vp[:, :, :n_chunks * c].view(b_, hk, n_chunks, c, d_v)
        dfk[:, :, :n_chunks * c] += (vc @ g_h.transpose(-2, -1)).add_(g_z[:, :, :, None, :]).view(b_, hk, -1, m)
        dv[:, :, :n_chunks * c] += (fkc @ g_h).view(b_, hk, -1, d_v)

    # -- in_pattern ----------------------------------------------------------------------------------------
    def _to_u(self, tab: Tables, *ts):
        return ts if tab.tok is None else tuple(t.index_select(2, tab.tok.to(t.device)) for t in ts)

    def _sink_mask(self, tab: Tables, causal: bool, device) -> torch.Tensor:
        """[n, n_sinks] (u-order rows): sinks outside the row's interval that the site allows."""
        su = tab.sink_u[None, :]
        outside = (su < tab.lo_u[:, None]) | (su > tab.hi_u[:, None])
        if causal:  # token order: sink token j <= query token
            qtok = tab.tok if tab.tok is not None else torch.arange(tab.n)
            outside = outside & (torch.arange(su.shape[1])[None, :] <= qtok[:, None])
        return outside.to(device)

    def _pad_rows(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        return x if x.shape[2] == rows else torch.cat([x, x.new_zeros(*x.shape[:2], rows - x.shape[2], *x.shape[3:])], 2)

    def _sinks(self, tab: Tables, causal: bool, fq_u, fk, v):
        """Sinks outside each row's interval: (mask, grouped u-order queries, sink keys, sink values)."""
        hk, ns = fk.shape[1], tab.sink_u.numel()
        return (self._sink_mask(tab, causal, fq_u.device), _grouped(fq_u, hk), fk[:, :, None, :ns],
                v[:, :, None, :ns])

    def _block_states(self, tab: Tables, keys):
        """Non-causal ``A \\ P``, block by block: ``H_all - H[c0_hi] + H[c0_lo]`` [B, Hk, nb, m, Dv] and the same of
        ``Z`` [B, Hk, nb, m] (one state per block of rows instead of one per end and one for all keys). Gathered
        run by run (each run's states are one strided view: no index tensors, no temporaries)."""
        out = []
        for st in keys[2:4]:
            nb = tab.hi.c0.numel()
            blk = st.new_empty(*st.shape[:2], nb, *st.shape[3:])
            for run in tab.hi.runs:
                torch.sub(st[:, :, -1:], _run_view(st, 2, run.c_start, run.step, run.b1 - run.b0),
                          out=blk[:, :, run.b0:run.b1])
            for run in tab.lo.runs:
                blk[:, :, run.b0:run.b1].add_(_run_view(st, 2, run.c_start, run.step, run.b1 - run.b0))
            out.append(blk)
        return out[0], out[1]

    @staticmethod
    def _scatter_states(tab: Tables, d_st: torch.Tensor, d_blk: torch.Tensor) -> None:
        """The adjoint of :meth:`_block_states` for one state (``d_st`` [B, Hk, n_chunks + 1, ..] += ...)."""
        d_st[:, :, -1] += d_blk.sum(2)
        for end, sign in ((tab.lo, 1.0), (tab.hi, -1.0)):
            for run in end.runs:
                part = d_blk[:, :, run.b0:run.b1]
                if run.step == 0:   # one state for the whole run
                    d_st[:, :, run.c_start].add_(part.sum(2), alpha=sign)
                else:               # distinct states: a strided view
                    _run_view(d_st, 2, run.c_start, run.step, run.b1 - run.b0).add_(part, alpha=sign)

    def forward(self, call, fq, fk, v, before: bool = False, outside: bool = False):
        """Sums over each query's keys in P(i) (its interval and the sinks outside it); ``before``
        (:attr:`Tables.ends_at_query` only): over ``A(i) \\ P(i)`` = the keys before the interval, sinks excluded;
        ``outside`` (:func:`outside_supported` only): over ``A(i) \\ P(i)`` = every key but the interval and the
        sinks, as ``fq . (H_all - H[c0_hi] + H[c0_lo]) - ragged_hi + ragged_lo`` (one state product per row)."""
        tab = tables(call.pattern, call.layout, call.is_causal, self.chunk)
        ct = fq.dtype
        n = tab.n
        c = self.chunk
        rows = -(-n // c) * c
        fq_u, fk_u, v_u = self._to_u(tab, fq, fk, v.to(ct))
        keys = self._keys(tab, fk_u, v_u, (tab.lo,) if before else (tab.lo, tab.hi))
        fqp = self._pad_rows(fq_u, rows)
        if outside:
            sh, sz = self._block_states(tab, keys)
            b_, hq, _, m = fqp.shape
            hk, nb = sh.shape[1], rows // c
            qg = _grouped(fqp, hk).view(b_, hk, hq // hk, nb, c, m)
            num_p = (qg @ sh[:, :, None]).view(b_, hq, rows, -1)
            den_p = (qg @ sz[:, :, None, :, :, None]).view(b_, hq, rows)
            self._eval(tab, tab.hi, fqp, keys, (num_p, den_p), -1.0)
            self._eval(tab, tab.lo, fqp, keys, (num_p, den_p), 1.0)
            num, den = num_p[:, :, :n], den_p[:, :, :n]
        else:
            n_lo, d_lo = self._eval(tab, tab.lo, fqp, keys)
            if before:
                num, den = n_lo[:, :, :n], d_lo[:, :, :n]
            else:
                n_hi, d_hi = self._eval(tab, tab.hi, fqp, keys)
                keep = (~tab.empty).to(fq.device)
                num = n_hi[:, :, :n].sub_(n_lo[:, :, :n]).mul_(keep[:, None])
                den = d_hi[:, :, :n].sub_(d_lo[:, :, :n]).mul_(keep)
        if tab.sink_u.numel():  # rows in u-order, sink keys in token order (the first keys)
            sm, qg, ks, vs = self._sinks(tab, call.is_causal, fq_u, fk, v.to(ct))
            kap = (qg @ ks.transpose(-2, -1)) * sm
            sign = -1.0 if before or outside else 1.0
            num = num.add((kap @ vs).flatten(1, 2), alpha=sign)
            den = den.add(kap.sum(-1).flatten(1, 2), alpha=sign)
        if tab.tok is not None:  # back to token order
            num = torch.empty_like(num).index_copy_(2, tab.tok.to(fq.device), num)
            den = torch.empty_like(den).index_copy_(2, tab.tok.to(fq.device), den)
        return num, den

    def backward(self, call, fq, fk, v, gn, gd, before: bool = False, outside: bool = False):
        tab = tables(call.pattern, call.layout, call.is_causal, self.chunk)
        ct = fq.dtype
        fq_u, fk_u, v_u, gn_u, gd_u = self._to_u(tab, fq, fk, v.to(ct), gn, gd)
        n = tab.n
        c = self.chunk
        rows = -(-n // c) * c
        keys = self._keys(tab, fk_u, v_u, (tab.lo,) if before else (tab.lo, tab.hi))
        fqp = self._pad_rows(fq_u, rows)
        dfk, dv = torch.zeros_like(keys[0]), torch.zeros_like(keys[1])
        dh, dz = torch.zeros_like(keys[2]), torch.zeros_like(keys[3])
        if outside:
            gn_p, gd_p = self._pad_rows(gn_u, rows), self._pad_rows(gd_u, rows)
            sh, sz = self._block_states(tab, keys)
            b_, hq, _, m = fqp.shape
            hk, nb, rep = sh.shape[1], rows // c, hq // sh.shape[1]
            qg = _grouped(fqp, hk).view(b_, hk, rep, nb, c, m)
            gg = _grouped(gn_p, hk).view(b_, hk, rep, nb, c, -1)
            gz = _grouped(gd_p, hk).view(b_, hk, rep, nb, c, 1)
            dfq = (gg @ sh[:, :, None].transpose(-2, -1)).addcmul_(gz, sz[:, :, None, :, None, :])
            dfq = dfq.view(b_, hq, rows, m)
            dsh = (qg.transpose(-2, -1) @ gg).sum(2)                           # [B, Hk, nb, m, Dv]
            dsz = (qg * gz).sum((2, 4))                                         # [B, Hk, nb, m]
            self._scatter_states(tab, dh, dsh)
            self._scatter_states(tab, dz, dsz)
            self._eval_backward(tab, tab.lo, fqp, keys, gn_p, gd_p, dfq, dfk, dv, dh, dz, states=False)
            self._eval_backward(tab, tab.hi, fqp, keys, gn_p.neg(), gd_p.neg(), dfq, dfk, dv, dh, dz,
                                states=False)
        elif before:
            dfq = torch.zeros_like(fqp)
            self._eval_backward(tab, tab.lo, fqp, keys, self._pad_rows(gn_u, rows), self._pad_rows(gd_u, rows), dfq,
                                dfk, dv, dh, dz)
        else:
            dfq = torch.zeros_like(fqp)
            keep = (~tab.empty).to(fq.device)
            gn_w = self._pad_rows(gn_u * keep[:, None], rows)    # empty intervals: the window part is 0
            gd_w = self._pad_rows(gd_u * keep, rows)
            self._eval_backward(tab, tab.hi, fqp, keys, gn_w, gd_w, dfq, dfk, dv, dh, dz)
            self._eval_backward(tab, tab.lo, fqp, keys, gn_w.neg_(), gd_w.neg_(), dfq, dfk, dv, dh, dz)
        self._states_backward(tab, keys, dh, dz, dfk, dv)
        dfq, dfk, dv = dfq[:, :, :n], dfk[:, :, :n], dv[:, :, :n]
        ns = tab.sink_u.numel()
        if ns:
            sm, qg, ks, vs = self._sinks(tab, call.is_causal, fq_u, fk, v.to(ct))
            hk = fk.shape[1]
            sign = -1.0 if before or outside else 1.0
            gng, gdg = _grouped(gn_u, hk) * sign, _grouped(gd_u, hk) * sign
            kap = (qg @ ks.transpose(-2, -1)) * sm
            dk_ = (gng @ vs.transpose(-2, -1) + gdg[..., None]) * sm
            dfq += (dk_ @ ks).flatten(1, 2)
            d_fk_s = (dk_.transpose(-2, -1) @ qg).sum(2)
            d_v_s = (kap.transpose(-2, -1) @ gng).sum(2)
        if tab.tok is not None:  # back to token order
            tok = tab.tok.to(fq.device)
            dfq = torch.empty_like(dfq).index_copy_(2, tok, dfq)
            dfk = torch.empty_like(dfk).index_copy_(2, tok, dfk)
            dv = torch.empty_like(dv).index_copy_(2, tok, dv)
        if ns:
            dfk[:, :, :ns] += d_fk_s
            dv[:, :, :ns] += d_v_s
        return dfq, dfk, dv
