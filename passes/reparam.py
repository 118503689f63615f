"""Structural reparameterization: merge parallel linear branches, collapse linear chains.

``reparam``: a sum of parallel linear branches of the same input becomes one Conv
-----------------------------------------------------------------------------------
A sum is a tree of ``Add`` (any association order, ``(a+b)+c`` or ``a+(b+c)``) or ``Sum`` nodes
whose inner results have no other reader.  Its leaves are *branches* of an input ``x``:

- ``Conv(x; W_b, b_b)`` of kernel ``k_b`` (any size up to the largest, ``1xk``/``kx1`` too), pads
  ``p_b``, optionally followed by ``BatchNormalization`` ``y = s*z + t`` with
  ``s = gamma/sqrt(var+eps)``, ``t = beta - mean*s``, folded first: ``W_b <- s[o] W_b``,
  ``b_b <- s*b_b + t``;
- ``BatchNormalization(x)`` alone: ``s[c] x[c] + t[c]``, i.e. a 1x1 conv whose kernel is
  ``s[c]`` at ``W[c, c mod (C/g)]`` (the identity in grouped form), bias ``t``;
- ``x`` itself: the same with ``s = 1``, ``t = 0``.

All convolutions must share stride, dilation ``d`` and groups ``g`` (identity-like branches need
stride 1 and ``C_in = C_out``).  Conv is linear in its kernel, so ``sum_b conv(x; W_b) =
conv(x; sum_b W_b)`` once every kernel is placed on a common grid.  Output position ``o`` of branch
``b`` reads input ``o*s - p_b + i*d``; with merged begin pad ``P = max_b p_b`` that input is tap
``i + (P - p_b)/d`` of the merged kernel, so kernel ``b`` goes at offset ``(P - p_b)/d`` (which
must be an integer) and the merged size is ``K = max_b(offset_b + k_b)``.  Out-of-range inputs
are zero in every branch and in the merged conv alike, so borders are exact.  The end pad is
``p_end_b + d*(K - k_b - offset_b)``, which must agree between branches (or, with a static input
shape, give the same output size); otherwise the branches do not line up and the sum is left
alone.  The merged bias is ``sum_b b_b``.  Summands that are not branches of the chosen input
(a residual from elsewhere, a non-linearity) stay as ``Add`` after the merged Conv.

``collapse-linear``: ``Conv -> [BatchNormalization] -> Conv`` with nothing non-linear between
----------------------------------------------------------------------------------------------
``z = conv1(x)`` (stride ``s1``, dilation ``d1``, pads ``p1``), ``y = conv2(z)`` (stride ``s2``,
dilation ``d2``).  Any BatchNormalization between is first folded into conv1 as above.

- conv2 without padding: ``y[o,t] = b2[o] + sum_{m,j2} W2[o,m,j2] z[m, t*s2 + j2*d2]`` and
  ``z[m,u] = b1[m] + sum_{i,j1} W1[m,i,j1] xpad[i, u*s1 + j1*d1]`` give one conv of ``xpad``
  (pads ``p1``) with stride ``s1*s2``, dilation 1, kernel ``K = s1*d2*(k2-1) + d1*(k1-1) + 1``,
  ``W[o,i,q] = sum_{m, j2*d2*s1 + j1*d1 = q} W2[o,m,j2] W1[m,i,j1]`` and
  ``b = b2 + sum_{m,j2} W2[o,m,j2] b1[m]``.  Every ``z`` that conv2 reads is a real conv1 output,
  so this is exact everywhere, borders included.
- conv1 is 1x1, stride 1, no padding and conv2 pads: the merged conv keeps conv2's geometry with
  ``W[o,i,j] = sum_m W2[o,m,j] W1[m,i]``.  conv2 pads ``z`` with zeros, while the merged conv pads
  ``x`` with zeros, where conv1 would give ``b1``: exact only if ``b1 = 0`` (otherwise rejected:
  "not exact at the borders").
- Groups: weights are expanded to dense, composed, and regrouped when both convs have the same
  groups (group ``j`` of conv2 reads only mid channels computed from input group ``j``).  The fold
  is skipped when the merged conv would cost more multiply-adds per output pixel than the two
  convs (``1x1 -> kxk`` that widens channels, depthwise-separable pairs).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

import numpy as np
import onnx_ir as ir

from edgec import ir as eir
from edgec.passes_api import Pass, PassResult, PassStats, register_pass
from edgec.verify import Tolerance

from ._match import (
    Affine,
    ConvGeom,
    ConvInfo,
    bn_affine,
    const_array,
    conv_info,
    dense_weight,
    dilate_kernel,
    group_weight,
    is_op,
    make_conv,
    node_label,
    numel,
    replace_with_node,
    single_use_by,
    spatial_positions,
    static_shape,
)

__all__ = ["Reparameterize", "CollapseLinear", "fold_affine_into_conv"]


def fold_affine_into_conv(info: ConvInfo, affine: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Weights of ``affine(conv(x))``: ``W' = s[o] W``, ``b' = s*b + t`` (float64)."""
    w = info.weight.astype(np.float64)
    s = affine.scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b = np.zeros(info.cout) if info.bias is None else info.bias.astype(np.float64)
    return w * s, b * affine.scale + affine.shift


def _kernel_label(kernel: tuple[int, ...], groups: int, cout: int) -> str:
    label = "x".join(map(str, kernel))
    if groups > 1:
        label += "dw" if groups == cout else f"g{groups}"
    return label


@dataclasses.dataclass(frozen=True)
class _Branch:
    kind: str  # "conv", "bn" or "identity"
    x: ir.Value
    nodes: tuple[ir.Node, ...]
    label: str
    weight: np.ndarray | None = None  # float64 [Cout, Cin/g, k...], BN folded in
    bias: np.ndarray | None = None
    geom: ConvGeom | None = None
    affine: Affine | None = None
    dtype: np.dtype | None = None


def _classify(v: ir.Value, reader: ir.Node) -> tuple[_Branch, str | None]:
    """The summand ``v`` (read by ``reader``) as a branch, plus why it is not a richer one."""
    bare = _Branch("identity", v, (), "id")
    p = v.producer()
    if p is None:
        return bare, None
    if is_op(p, "BatchNormalization"):
        why = single_use_by(v, reader)
        if why is not None:
            return bare, f"branch {node_label(p)} is used elsewhere ({why})"
        aff = bn_affine(p)
        if isinstance(aff, str):
            return bare, f"{node_label(p)}: {aff}"
        u = p.inputs[0]
        q = u.producer() if u is not None else None
        if is_op(q, "Conv"):
            why = single_use_by(u, p)
            info = conv_info(q)
            if why is None and not isinstance(info, str):
                w, b = fold_affine_into_conv(info, aff)
                label = _kernel_label(info.geom.kernel, info.geom.groups, info.cout) + "+bn"
                return _Branch("conv", q.inputs[0], (q, p), label, w, b, info.geom, dtype=info.weight.dtype), None
            reason = f"branch {node_label(q)} is used elsewhere ({why})" if why else f"{node_label(q)}: {info}"
            return _Branch("bn", u, (p,), "bn", affine=aff), reason
        return _Branch("bn", u, (p,), "bn", affine=aff), None
    if is_op(p, "Conv"):
        why = single_use_by(v, reader)
        if why is not None:
            return bare, f"branch {node_label(p)} is used elsewhere ({why})"
        info = conv_info(p)
        if isinstance(info, str):
            return bare, f"{node_label(p)}: {info}"
        b = np.zeros(info.cout) if info.bias is None else info.bias.astype(np.float64)
        label = _kernel_label(info.geom.kernel, info.geom.groups, info.cout)
        return _Branch("conv", p.inputs[0], (p,), label, info.weight.astype(np.float64), b, info.geom,
                       dtype=info.weight.dtype), None
    return bare, f"summand {v.name} comes from {p.op_type}, not from a linear branch"


def _would_read(v: ir.Value) -> ir.Value | None:
    """The input a Conv/BN/Conv+BN summand reads (whether or not it can be absorbed), else None."""
    p = v.producer()
    if is_op(p, "BatchNormalization"):
        q = p.inputs[0].producer() if p.inputs[0] is not None else None
        return q.inputs[0] if is_op(q, "Conv") else p.inputs[0]
    if is_op(p, "Conv"):
        return p.inputs[0]
    return None


def _sum_tree(root: ir.Node) -> tuple[list[tuple[ir.Value, ir.Node]], list[ir.Node]]:
    """Leaves ``(value, reader)`` and inner nodes of the Add/Sum tree rooted at ``root``."""
    leaves: list[tuple[ir.Value, ir.Node]] = []
    inner: list[ir.Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        inner.append(node)
        for v in node.inputs:
            if v is None:
                continue
            p = v.producer()
            if is_op(p, "Add", "Sum") and single_use_by(v, node) is None:
                stack.append(p)
            else:
                leaves.append((v, node))
    return leaves, inner


def _is_root(node: ir.Node) -> bool:
    out = node.outputs[0]
    if out.is_graph_output():
        return True
    uses = out.uses()
    return not (len(uses) == 1 and is_op(uses[0].node, "Add", "Sum"))


@dataclasses.dataclass
class _PatternTally:
    blocks: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0


def _params_of(nodes) -> int:
    seen: set[int] = set()
    total = 0
    for n in nodes:
        for v in n.inputs:
            if v is not None and v.is_initializer() and id(v) not in seen:
                seen.add(id(v))
                a = const_array(v)
                total += 0 if a is None else a.size
    return total


def _align(branches: list[_Branch], nd: int, dil: tuple[int, ...], x: ir.Value):
    """Merged kernel size, begin/end pads and per-branch offsets, or a reason string."""
    geoms = []
    for br in branches:
        if br.kind == "conv":
            geoms.append((br.geom.kernel, br.geom.pads_begin, br.geom.pads_end))
        else:
            geoms.append(((1,) * nd, (0,) * nd, (0,) * nd))
    K, Pb, Pe, offsets = [], [], [], [[0] * nd for _ in branches]
    xshape = static_shape(x)
    for a in range(nd):
        pb = max(g[1][a] for g in geoms)
        for bi, g in enumerate(geoms):
            if (pb - g[1][a]) % dil[a]:
                return f"branch pads are not a multiple of the dilation apart (axis {a})"
            offsets[bi][a] = (pb - g[1][a]) // dil[a]
        k = max(offsets[bi][a] + g[0][a] for bi, g in enumerate(geoms))
        ends = {g[2][a] + dil[a] * (k - g[0][a] - offsets[bi][a]) for bi, g in enumerate(geoms)}
        if len(ends) > 1:
            stride = branches[0].geom.strides[a] if branches[0].geom else 1
            for br in branches:
                if br.geom is not None:
                    stride = br.geom.strides[a]
            if xshape is None or len(xshape) != nd + 2:
                return "branches do not line up (different padding) and the input shape is unknown"
            h = xshape[2 + a]
            sizes = {(h + g[1][a] + g[2][a] - dil[a] * (g[0][a] - 1) - 1) // stride + 1 for g in geoms}
            if len(sizes) > 1:
                return f"branches produce different output sizes {sorted(sizes)} on axis {a}"
            pe = max(ends)
        else:
            pe = ends.pop()
        K.append(k)
        Pb.append(pb)
        Pe.append(pe)
    return tuple(K), tuple(Pb), tuple(Pe), offsets


def _merged_dilation(convs: list[_Branch]) -> tuple[int, ...] | str:
    """Per axis, the dilation shared by the branches whose kernel spans that axis (1x1 taps have none)."""
    nd = len(convs[0].geom.kernel)
    out = []
    for a in range(nd):
        vals = {b.geom.dilations[a] for b in convs if b.geom.kernel[a] > 1}
        if len(vals) > 1:
            return f"branches have different dilations on axis {a}: " + " vs ".join(map(str, sorted(vals)))
        out.append(vals.pop() if vals else 1)
    return tuple(out)


# Merging is exact in real arithmetic, but float32 sums the branch kernels before multiplying
# instead of summing the branch outputs: the rounding differs.  Measured on the zoo's training-form
# MobileOne-S0 (four 3x3 + one 1x1 + BN branches per block, random weights, 40 random inputs): up to
# 1.4e-4 of the output range (median 5e-5), so the default 1e-4 failed on one input in ~10.  1e-3
# keeps headroom; a real mistake (a misplaced tap, a wrong scale) is of the order of the output.
REASSOCIATION_TOLERANCE = Tolerance(rtol=1e-3, atol=1e-5)


@register_pass
class Reparameterize(Pass):
    name = "reparam"
    summary = "merge sums of parallel Conv/Conv+BN/BN/identity branches into one Conv (RepVGG, MobileOne, ACNet)"
    tolerance = REASSOCIATION_TOLERANCE

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        graph = model.graph
        tallies: dict[str, _PatternTally] = collections.defaultdict(_PatternTally)
        for node in list(graph):
            if node.graph is not graph or not is_op(node, "Add", "Sum") or not _is_root(node):
                continue
            self._try(graph, node, stats, tallies)
        for pattern, t in sorted(tallies.items()):
            stats.note(
                f"{pattern}: {t.blocks} blocks merged, nodes {t.nodes_before} -> {t.nodes_after}, "
                f"params {t.params_before} -> {t.params_after}"
            )
        return self.result(model, stats)

    def _try(self, graph: ir.Graph, root: ir.Node, stats: PassStats, tallies) -> None:
        leaves, inner = _sum_tree(root)
        if len(leaves) < 2:
            return
        classified = [(_classify(v, reader)) for v, reader in leaves]
        groups: dict[int, list[int]] = collections.defaultdict(list)
        for i, (br, _) in enumerate(classified):
            groups[id(br.x)].append(i)
        # the input with the most branches, at least one of them a Conv
        candidates = [ix for ix in groups.values() if any(classified[i][0].kind == "conv" for i in ix)]
        if not candidates:
            return
        chosen = max(candidates, key=len)
        label = node_label(root)
        x = classified[chosen[0]][0].x
        if len(chosen) < 2:
            if any(const_array(v) is not None for v, _ in leaves):
                return  # conv + constant is fold-scale's business
            details = []
            for i, (v, _) in enumerate(leaves):
                if i in chosen:
                    continue
                why, reads = classified[i][1], _would_read(v)
                if why and (reads is x or reads is None):
                    details.append(why)
                elif reads is not None:
                    details.append(f"summand {v.name} is computed from {reads.name}, not {x.name}")
                else:
                    details.append(f"summand {v.name} is not a branch of {x.name}")
            stats.reject("reparam", label, f"only one linear branch of {x.name} in the sum: " + "; ".join(details))
            return
        branches = [classified[i][0] for i in chosen]
        reason = self._check(branches, x)
        if isinstance(reason, str):
            stats.reject("reparam", label, reason)
            return
        self._merge(graph, root, inner, leaves, chosen, branches, x, stats, tallies)

    @staticmethod
    def _check(branches: list[_Branch], x: ir.Value) -> str | None:
        convs = [b for b in branches if b.kind == "conv"]
        dil = _merged_dilation(convs)
        if isinstance(dil, str):
            return dil
        for attr, what in (("strides", "strides"), ("groups", "groups")):
            vals = {getattr(b.geom, attr) for b in convs}
            if len(vals) > 1:
                return f"branches have different {what}: " + " vs ".join(map(str, sorted(vals)))
        couts = {b.weight.shape[0] for b in convs}
        cins = {b.weight.shape[1] * b.geom.groups for b in convs}
        if len(couts) > 1 or len(cins) > 1:
            return "branches have different channel counts"
        if len({b.weight.ndim for b in convs}) > 1:
            return "branches have different spatial ranks"
        if len({np.dtype(b.dtype) for b in convs}) > 1:
            return "branches have different weight dtypes"
        if not np.issubdtype(convs[0].dtype, np.floating):
            return "weights are not floating point"
        ident = [b for b in branches if b.kind != "conv"]
        if ident:
            if any(s != 1 for s in convs[0].geom.strides):
                return f"an identity/BN branch sums with stride-{max(convs[0].geom.strides)} convs"
            if couts != cins:
                return "an identity/BN branch needs as many output as input channels"
            for b in ident:
                if b.affine is not None and b.affine.scale.size != next(iter(couts)):
                    return "BatchNormalization channel count does not match the convs"
        return None

    def _merge(self, graph, root, inner, leaves, chosen, branches, x, stats, tallies) -> None:
        convs = [b for b in branches if b.kind == "conv"]
        g0 = convs[0].geom
        nd = len(g0.kernel)
        dil = _merged_dilation(convs)
        aligned = _align(branches, nd, dil, x)
        if isinstance(aligned, str):
            stats.reject("reparam", node_label(root), aligned)
            return
        K, Pb, Pe, offsets = aligned
        cout = convs[0].weight.shape[0]
        cin_g = convs[0].weight.shape[1]
        groups = g0.groups
        W = np.zeros((cout, cin_g, *K))
        B = np.zeros(cout)
        chan = np.arange(cout)
        for br, off in zip(branches, offsets):
            if br.kind == "conv":
                sl = tuple(slice(o, o + k) for o, k in zip(off, br.geom.kernel))
                W[(slice(None), slice(None), *sl)] += br.weight
                B += br.bias
            else:
                scale = np.ones(cout) if br.affine is None else br.affine.scale
                W[(chan, chan % cin_g, *[np.full(cout, o) for o in off])] += scale
                if br.affine is not None:
                    B += br.affine.shift
        dtype = convs[0].dtype
        name = f"{node_label(root)}_reparam"
        conv = make_conv(graph, x, W, B, strides=g0.strides, dilations=dil, pads=list(Pb) + list(Pe),
                         groups=groups, name=name, dtype=dtype)
        new_nodes = [conv]
        out = conv.outputs[0]
        for i, (v, _) in enumerate(leaves):
            if i in chosen:
                continue
            add = ir.node("Add", [out, v], name=f"{name}_add{len(new_nodes)}")
            new_nodes.append(add)
            out = add.outputs[0]
        old_nodes = list(inner) + [n for br in branches for n in br.nodes]
        params_before = _params_of(old_nodes)
        replace_with_node(graph, root, old_nodes, new_nodes, root.outputs[0], out)
        counts = collections.Counter(b.label for b in branches)
        pattern = " + ".join(f"{lab}" if c == 1 else f"{lab}*{c}" for lab, c in sorted(counts.items()))
        pattern = f"reparam[{pattern}]"
        stats.count(pattern)
        t = tallies[pattern]
        t.blocks += 1
        t.nodes_before += len(old_nodes)
        t.nodes_after += len(new_nodes)
        t.params_before += params_before
        t.params_after += W.size + B.size


# ---------------------------------------------------------------------------------------------
# collapse-linear


def _macs_per_pixel(cout: int, cin: int, groups: int, kernel) -> int:
    return cout * (cin // groups) * numel(kernel)


@register_pass
class CollapseLinear(Pass):
    name = "collapse-linear"
    summary = "merge Conv -> [BatchNormalization] -> Conv chains with no non-linearity between (exact only)"
    tolerance = REASSOCIATION_TOLERANCE

    def call(self, model: ir.Model) -> PassResult:
        stats = PassStats()
        graph = model.graph
        changed = True
        while changed:  # a chain of three convs collapses pairwise
            changed = False
            for node in list(graph):
                if node.graph is graph and is_op(node, "Conv") and self._try(graph, node, stats):
                    changed = True
        return self.result(model, stats)

    def _try(self, graph: ir.Graph, conv2: ir.Node, stats: PassStats) -> bool:
        z = conv2.inputs[0]
        p = z.producer() if z is not None else None
        bn = None
        if is_op(p, "BatchNormalization"):
            bn, bn_out = p, z
            z = p.inputs[0]
            p = z.producer() if z is not None else None
        if not is_op(p, "Conv"):
            return False
        label = node_label(conv2)
        pattern = "conv-bn-conv" if bn is not None else "conv-conv"
        if bn is not None:
            why = single_use_by(bn_out, conv2) or single_use_by(z, bn)
        else:
            why = single_use_by(z, conv2)
        if why is not None:
            stats.reject(pattern, label, f"the first conv's output is used elsewhere ({why})")
            return False
        i1, i2 = conv_info(p), conv_info(conv2)
        for info in (i1, i2):
            if isinstance(info, str):
                stats.reject(pattern, label, info)
                return False
        assert isinstance(i1, ConvInfo) and isinstance(i2, ConvInfo)
        if i1.weight.ndim != i2.weight.ndim or i1.cout != i2.cin:
            return False
        w1 = i1.weight.astype(np.float64)
        b1 = np.zeros(i1.cout) if i1.bias is None else i1.bias.astype(np.float64)
        if bn is not None:
            aff = bn_affine(bn)
            if isinstance(aff, str):
                stats.reject(pattern, label, aff)
                return False
            w1, b1 = fold_affine_into_conv(i1, aff)
        w2 = i2.weight.astype(np.float64)
        b2 = np.zeros(i2.cout) if i2.bias is None else i2.bias.astype(np.float64)
        g1, g2 = i1.geom, i2.geom
        nd = len(g1.kernel)
        d1 = dense_weight(dilate_kernel(w1, g1.dilations), g1.groups)  # [M, Cin, K1]
        d2 = dense_weight(w2, g2.groups)  # [Cout, M, k2]
        out_groups = g1.groups if g1.groups == g2.groups else 1
        pointwise1 = all(k == 1 for k in g1.kernel) and all(s == 1 for s in g1.strides) and not g1.padded
        if not g2.padded:
            K = tuple(s1 * dd2 * (k2 - 1) + dd1 * (k1 - 1) + 1
                      for s1, dd2, k2, dd1, k1 in zip(g1.strides, g2.dilations, g2.kernel, g1.dilations, g1.kernel))
            W = np.zeros((i2.cout, i1.cin, *K))
            k1d = d1.shape[2:]
            for j2 in spatial_positions(g2.kernel):
                off = tuple(j * dd2 * s1 for j, dd2, s1 in zip(j2, g2.dilations, g1.strides))
                sl = tuple(slice(o, o + k) for o, k in zip(off, k1d))
                W[(slice(None), slice(None), *sl)] += np.einsum("om,mi...->oi...", d2[(slice(None), slice(None), *j2)], d1)
            strides = tuple(a * b for a, b in zip(g1.strides, g2.strides))
            dil = (1,) * nd
            pads = g1.pads()
        elif pointwise1:
            if np.any(b1 != 0):
                stats.reject(pattern, label, "the 1x1 conv has a bias and the next conv pads with zeros: "
                             "not exact at the borders")
                return False
            W = np.einsum("om...,mi->oi...", d2, d1.reshape(d1.shape[:2]))
            strides, dil, pads = g2.strides, g2.dilations, g2.pads()
        else:
            stats.reject(pattern, label, "the second conv pads a non-pointwise conv's output: not exact at the borders")
            return False
        spatial2 = tuple(range(2, w2.ndim))
        B = b2 + np.einsum("om,m->o", w2.sum(axis=spatial2) if g2.groups == 1 else d2.sum(axis=spatial2), b1)
        before = _macs_per_pixel(i2.cout, i2.cin, g2.groups, g2.kernel) + numel(g2.strides) * _macs_per_pixel(
            i1.cout, i1.cin, g1.groups, g1.kernel)
        after = _macs_per_pixel(i2.cout, i1.cin, out_groups, W.shape[2:])
        if after > before:
            stats.reject(pattern, label, f"merging would raise the cost from {before} to {after} MACs per output pixel")
            return False
        weight = group_weight(W, out_groups)
        old_nodes = [p] + ([bn] if bn is not None else []) + [conv2]
        conv = make_conv(graph, p.inputs[0], weight, B, strides=strides, dilations=dil, pads=pads, groups=out_groups,
                         name=f"{label}_collapsed", dtype=i2.weight.dtype)
        replace_with_node(graph, conv2, old_nodes, [conv], conv2.outputs[0], conv.outputs[0])
        stats.count(pattern)
        return True
