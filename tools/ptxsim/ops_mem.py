"""Memory instructions: ld, st (param/global/shared, vectors), cvta, cp.async, atom, red, membar.

cp.async is modelled as deferred: at issue the source bytes are captured (and bounds-checked) and
the destination is marked in flight; the bytes land in shared memory only when the issuing thread
executes cp.async.wait_group N (all its committed groups except the newest N) or
cp.async.wait_all.  A read of the destination before that is a SanitizerError, and without the
sanitizer it sees the old contents, as hardware may.

Atomics from several threads of one instruction are applied one after another in thread order
(each returning the value it saw), vectorised by rounds over distinct addresses.
"""
from __future__ import annotations

import numpy as np

from .decode import SHARED_GENERIC, op

_LDTYPES = {f"{k}{b}" for k in "usb" for b in (8, 16, 32, 64)} | {"f16", "f32", "f64"}


def _space(d, s, fl, allowed):
    sp = d.one_of(s, fl, ["global", "shared", "param"])
    if sp is None or sp not in allowed:
        raise d.err(s, f"{s.opcode} needs a state space among {sorted(allowed)} (generic addressing "
                       f"is not supported)")
    return sp


def _vec(d, s, fl):
    v = d.one_of(s, fl, ["v2", "v4"])
    return {None: 1, "v2": 2, "v4": 4}[v]


def _elems(d, s, o, n):
    return [o] if n == 1 else d.vec(s, o, n)


def _bytes_to(b, T):
    return np.ascontiguousarray(b).view(T.np).reshape(-1)


@op("ld")
def dec_ld(d, s):
    fl, (T,) = d.mods(s, {"global", "shared", "param", "nc", "v2", "v4"}, 1, _LDTYPES)
    sp = _space(d, s, fl, {"global", "shared", "param"})
    if "nc" in fl and sp != "global":
        raise d.err(s, ".nc applies to ld.global only")
    n = _vec(d, s, fl)
    es = T.bits // 8
    if n * es > 16:
        raise d.err(s, "vector access wider than 16 bytes")
    dst, a = d.nops(s, 2)
    ws = [d.writer(s, o, T, wide=T.kind in "usb") for o in _elems(d, s, dst, n)]
    size = n * es
    if sp == "param":
        if a[0] != "addr" or a[1] not in d.params:
            raise d.err(s, "ld.param needs [param_name(+offset)]")
        poff = d.params[a[1]][0] + a[2]
        if poff + size > d.param_size or poff % es:
            raise d.err(s, "ld.param outside the parameter list or misaligned")

        def run_p(st, idx):
            b = st.param[poff: poff + size]
            for k, w in enumerate(ws):
                v = b[k * es:(k + 1) * es].view(T.np)[0]
                w(st, idx, np.full(idx.size, v))
        return run_p
    addr = d.address(s, a, sp)

    def run(st, idx):
        ad = addr(st, idx)
        if sp == "global":
            off = st.mem.offsets(ad, size, st, idx, "load")
            b = st.mem.gather(off, size)
        else:
            off = st.shared.offsets(ad, size, st, idx, "load")
            b = st.shared.load(off, size, st, idx)
        for k, w in enumerate(ws):
            w(st, idx, _bytes_to(b[:, k * es:(k + 1) * es], T))
    return run


@op("st")
def dec_st(d, s):
    fl, (T,) = d.mods(s, {"global", "shared", "v2", "v4"}, 1, _LDTYPES)
    sp = _space(d, s, fl, {"global", "shared"})
    n = _vec(d, s, fl)
    es = T.bits // 8
    if n * es > 16:
        raise d.err(s, "vector access wider than 16 bytes")
    a, src = d.nops(s, 2)
    rs = [d.reader(s, o, T, wide=T.kind in "usb") for o in _elems(d, s, src, n)]
    addr = d.address(s, a, sp)
    size = n * es

    def run(st, idx):
        ad = addr(st, idx)
        data = np.concatenate([np.ascontiguousarray(r(st, idx)).view(np.uint8).reshape(idx.size, es)
                               for r in rs], axis=1) if n > 1 else \
            np.ascontiguousarray(rs[0](st, idx)).view(np.uint8).reshape(idx.size, es)
        if sp == "global":
            st.mem.scatter(st.mem.offsets(ad, size, st, idx, "store"), data)
        else:
            st.shared.store(st.shared.offsets(ad, size, st, idx, "store"), data, st, idx)
    return run


@op("cvta")
def dec_cvta(d, s):
    fl, (T,) = d.mods(s, {"to", "global", "shared"}, 1, {"u32", "u64"})
    sp = d.one_of(s, fl, ["global", "shared"], required=True)
    to = "to" in fl
    dst, a = d.nops(s, 2)
    ra, w = d.reader(s, a, T), d.writer(s, dst, T)
    if sp == "global":
        if T.bits != 64:
            raise d.err(s, "global addresses are 64-bit")
        delta = 0
    else:
        delta = -SHARED_GENERIC if to else SHARED_GENERIC
        if T.bits == 32 and not to:
            raise d.err(s, "cvta.shared to a 32-bit generic address is not supported")

    def run(st, idx):
        v = ra(st, idx)
        w(st, idx, (v.astype(np.int64) + delta).astype(T.np) if delta else v)
    return run


@op("membar")
def dec_membar(d, s):
    if s.mods != ["cta"] or s.operands:
        raise d.err(s, "only membar.cta is supported")
    return lambda st, idx: None


@op("cp")
def dec_cp(d, s):
    m = s.mods
    if m[:1] != ["async"]:
        raise d.err(s, "only cp.async is supported")
    if m == ["async", "commit_group"]:
        d.nops(s, 0)

        def commit(st, idx):
            st.cp_committed[idx] += 1
        return commit
    if m in (["async", "wait_group"], ["async", "wait_all"]):
        if m[1] == "wait_group":
            o = d.nops(s, 1)[0]
            if o[0] != "imm" or o[1] < 0:
                raise d.err(s, "cp.async.wait_group needs an immediate N >= 0")
            keep = o[1]
        else:
            d.nops(s, 0)
            keep = None

        def wait(st, idx):
            cp_wait(st, idx, keep)
        return wait
    if m not in (["async", "ca", "shared", "global"], ["async", "cg", "shared", "global"]):
        raise d.err(s, f"unsupported cp form cp.{'.'.join(m)}")
    dst, src, sz = d.nops(s, 3)
    if sz[0] != "imm" or sz[1] not in ((4, 8, 16) if m[1] == "ca" else (16,)):
        raise d.err(s, "cp.async size must be 4, 8 or 16 (.cg: 16)")
    size = sz[1]
    rd, rs = d.address(s, dst, "shared"), d.address(s, src, "global")

    def issue(st, idx):
        goff = st.mem.offsets(rs(st, idx), size, st, idx, "cp.async read")
        soff = st.shared.offsets(rd(st, idx), size, st, idx, "cp.async write")
        st.shared.async_issue(soff, size, st, idx)
        st.cp_pending.append((idx.copy(), soff, st.mem.gather(goff, size), st.cp_committed[idx].copy()))
    return issue


def cp_wait(st, idx, keep):
    inset = np.zeros(st.nthreads, bool)
    inset[idx] = True
    rest = []
    for tids, doff, data, grp in st.cp_pending:
        m = inset[tids]
        if keep is not None:
            m &= grp < st.cp_committed[tids] - keep
        if m.any():
            st.shared.async_apply(doff[m], data[m], tids[m])
        if not m.all():
            k = ~m
            rest.append((tids[k], doff[k], data[k], grp[k]))
    st.cp_pending = rest


_ATOM = {
    ("add", "u32"), ("add", "s32"), ("add", "u64"), ("add", "f32"), ("min", "u32"), ("min", "s32"),
    ("max", "u32"), ("max", "s32"), ("exch", "b32"), ("and", "b32"), ("or", "b32"), ("xor", "b32"),
}
_AFN = {"add": np.add, "min": np.minimum, "max": np.maximum, "exch": lambda a, b: b,
        "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}


@op("atom", "red")
def dec_atom(d, s):
    ops_ = {"add", "min", "max", "exch", "and", "or", "xor"}
    fl, (T,) = d.mods(s, {"global", "shared"} | ops_, 1)
    sp = _space(d, s, fl, {"global", "shared"})
    aop = d.one_of(s, fl, sorted(ops_), required=True)
    if (aop, T.name) not in _ATOM:
        raise d.err(s, f"{s.opcode}.{aop}.{T.name} is not implemented")
    is_red = s.opcode == "red"
    ops = d.nops(s, 2 if is_red else 3)
    w = None if is_red else d.writer(s, ops[0], T)
    addr = d.address(s, ops[-2], sp)
    rb = d.reader(s, ops[-1], T)
    f = _AFN[aop]
    size = T.bits // 8

    def run(st, idx):
        ad, val = addr(st, idx), rb(st, idx)
        if sp == "global":
            off = st.mem.offsets(ad, size, st, idx, "atomic")
            buf = st.mem.heap
        else:
            off = st.shared.offsets(ad, size, st, idx, "atomic")
            st.shared.atomic_check(off, size, st, idx)
            buf = st.shared.data
        old = np.empty(idx.size, T.np)
        remaining = np.arange(idx.size)
        cols = np.arange(size)
        while remaining.size:          # one round per multiplicity, threads in ascending order
            _, first = np.unique(off[remaining], return_index=True)
            sel = remaining[first]
            B = off[sel][:, None] + cols
            cur = np.ascontiguousarray(buf[B]).view(T.np).reshape(-1)
            old[sel] = cur
            with np.errstate(all="ignore"):
                new = f(cur, val[sel]).astype(T.np)
            buf[B] = new.view(np.uint8).reshape(-1, size)
            remaining = np.delete(remaining, first)
        if w is not None:
            w(st, idx, old)
    return run

