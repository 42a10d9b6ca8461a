"""One rule per instruction kind: each renders that kind's `__device__` function.

Every consumer function has the same signature, `(const Params& p, const Task& t, int pos,
int step, const Smem& sm, Ring& ring)`: `t` carries the task's layer and params (schedule.py),
`pos` is the position of this step's token, `step` the step's index within the launch, `sm` the
CTA's shared memory and `ring` the consumers' place in its weight ring.

Five kinds are a matvec plus an epilogue (`Matvec`): they say which input they read (optionally
RMS-normed), which weight row is output row v, and what to do with each output y[v][b]; the
shared machinery (`matvec` in amk.cuh) stages the input, reads each weight row once for all B
batch rows and reduces in a fixed order. Each Matvec kind also gets a producer function,
`load_<name>(p, t, sm, ring)`, built from the same setup, K, row count and row map, which streams
the task's weight rows into the ring (`load_matvec`) for the consumers to read in the same order.
The other five are short loops (`Loop`) that read no weights through the ring. Semantics are
fused.py's, over the buffers in `Params`.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.codegen.emit import Emitter
from compiler.ir.fused import Kind

SIGNATURE = (
    "(const Params& p, const Task& t, const int pos, const int step, const Smem& sm, Ring& ring)"
)
LOAD_SIGNATURE = "(const Params& p, const Task& t, const Smem& sm, Ring& ring)"


@dataclass(frozen=True)
class Matvec:
    """y[v][b] = W_row(v) . xin[b] over K columns for v < rows; then `epilogue` for each (v, b)."""

    doc: str
    setup: tuple[str, ...]  # the task's params as named locals
    k: str  # K, a constexpr
    src: str  # input rows, [B][ld] fp32
    ld: str
    norm: str  # RMSNorm weight of the input, or nullptr
    rows: str  # output rows of the task
    row: tuple[str, ...]  # body of the lambda row(v) -> const bf16*: weight row of output v
    epilogue: tuple[str, ...]  # per output: v, b and y (the outputs, y[v * B + b]) in scope
    after: tuple[str, ...] = ()  # after every output is written
    outputs: str = ""  # rows the epilogue visits, if not all `rows`


@dataclass(frozen=True)
class Loop:
    """A kind that is a plain loop over its outputs."""

    doc: str
    body: tuple[str, ...]


Rule = Matvec | Loop

LAYER = "const Layer& w = p.layers[t.layer];"

RULES: dict[Kind, tuple[str, Rule]] = {
    Kind.EMBED: (
        "embed",
        Loop(
            "EMBED (c0, c1): x[b, c] = E[token[b], c] for columns c in [c0, c1)",
            (
                "const int c0 = t.a, n8 = (t.b - t.a) / 8;  // 8 columns per 16-byte load",
                "for (int i = threadIdx.x; i < B * n8; i += THREADS) {",
                "  const int b = i / n8, c = c0 + 8 * (i % n8);",
                "  const i64 tok = __ldcg(p.token + b);",
                "  if (tok < 0 || tok >= V) __trap();  // a token outside the vocabulary: never read past E",
                "  float f[8];",
                "  unpack8(ld_weight8(p.embed_tokens + tok * H + c), f);",
                "  float* dst = p.x + b * H + c;",
                "  *reinterpret_cast<float4*>(dst) = make_float4(f[0], f[1], f[2], f[3]);",
                "  *reinterpret_cast<float4*>(dst + 4) = make_float4(f[4], f[5], f[6], f[7]);",
                "}",
            ),
        ),
    ),
    Kind.QKV_ROPE_APPEND: (
        "qkv_rope_append",
        Matvec(
            "QKV_ROPE_APPEND (r0, r1): rows [r0, r1) of [Wq; Wk; Wv] in pair order, every batch row b:\n"
            "  task row j of a head is its element e(j) = j/2 + (j%2)*(D/2): rows 2i, 2i+1 the RoPE pair (i, i+D/2);\n"
            "  whole heads, or an even sub-range of one head (both halves of each pair in the task)\n"
            "  h = rms(x[b]) * w_in;  y = W h;  q, k = rope(y) per head;  q -> q[b];  k, v -> cache[b, :, pos]\n"
            "  rope(y)[e] = y[e] cos(a) + rotate_half(y)[e] sin(a),  a = pos * INV_FREQ[e mod D/2]  (fp32)",
            ("const int r0 = t.a, r1 = t.b;", LAYER),
            "H",
            "p.x",
            "H",
            "w.input_layernorm",
            "r1 - r0",
            (
                "const int r = r0 + v, j = r % D;  // task row j of its head",
                "const int pr = r - j + j / 2 + (j % 2) * (D / 2);  // physical row of [Wq; Wk; Wv]: element e(j)",
                "if (pr < QD) return w.q_proj + static_cast<size_t>(pr) * H;",
                "if (pr < QD + KVD) return w.k_proj + static_cast<size_t>(pr - QD) * H;",
                "return w.v_proj + static_cast<size_t>(pr - QD - KVD) * H;",
            ),
            (
                "const int j = (r0 + v) % D, el = j / 2 + (j % 2) * (D / 2);  // el: element e(j) of its head",
                "const int pr = r0 + v - j + el;  // physical row of [Wq; Wk; Wv]",
                "float out = y[v * B + b];",
                "if (pr < QD + KVD) {  // q or k: rows v and v ^ 1 are the pair (el, el +- D/2), r0 even",
                "  const float rot = el < D / 2 ? -y[(v + 1) * B + b] : y[(v - 1) * B + b];",
                "  float sn, cs;",
                "  sincosf(static_cast<float>(pos) * INV_FREQ[el % (D / 2)], &sn, &cs);",
                "  out = out * cs + rot * sn;",
                "}",
                "if (pr < QD) {",
                "  p.q[b * QD + pr] = out;",
                "} else {  // cache[b, head, pos, el] of the k or the v cache",
                "  const bool is_k = pr < QD + KVD;",
                "  const int kr = pr - (is_k ? QD : QD + KVD);",
                "  bf16* cache = is_k ? w.k_cache : w.v_cache;",
                "  cache[((static_cast<size_t>(b) * KV + kr / D) * S + pos) * D + el] = __float2bfloat16_rn(out);",
                "}",
            ),
        ),
    ),
    Kind.ATTN_PARTIAL: (
        "attn_partial",
        Loop(
            "ATTN_PARTIAL (g, part): query heads g*G .. g*G+G-1 against the keys j of partition `part`:\n"
            "  the n = pos + 1 - lo visible keys cut into P runs of c = ceil(n / P), this one\n"
            "  [lo + part*c, min(lo + (part+1)*c, pos + 1)) (a function of pos alone); s_j = q.k_j / sqrt(D); writes the\n"
            "  unnormalized o = sum_j exp(s_j - m) v_j, m = max_j s_j and l = sum_j exp(s_j - m) (no key: -inf, 0, 0).\n"
            "  Key slots keep online-softmax states (attn_keys), merged in the warp, then over warps in order.",
            (
                "const int g = t.a, part = t.b;",
                LAYER,
                "float* qs = sm.f;          // [G][D] queries of one batch row",
                "float* ws = sm.f + G * D;  // [NWARPS][D + 2] per-warp (o, m, l) of one head",
                "const int lo = WINDOW > 0 ? max(0, pos - WINDOW + 1) : 0;  // first key in the window",
                "const int n = pos + 1 - lo, c = (n + P - 1) / P;  // visible keys; keys per partition",
                "const int j0 = lo + part * c, j1 = min(j0 + c, pos + 1);  // empty when j0 > pos",
                "for (int b = 0; b < B; ++b) {",
                "  const size_t head0 = (static_cast<size_t>(b) * KV + g) * S * D;  // cache[b, g, 0, 0]",
                "  for (int i = threadIdx.x; i < G * D; i += THREADS) qs[i] = ld_act(p.q + b * QD + g * G * D + i);",
                "  cta_sync();",
                "  float m[G], l[G], o[G][8];",
                "  attn_keys(qs, w.k_cache + head0, w.v_cache + head0, j0, j1, m, l, o);",
                "  attn_merge_slots(m, l, o);",
                "#pragma unroll",
                "  for (int h = 0; h < G; ++h) {",
                "    const size_t bh = static_cast<size_t>(b * HQ + g * G + h) * P + part;  // [b, head, part]",
                "    attn_merge_warps(ws, m[h], l[h], o[h], p.attn_o + bh * D, p.attn_m + bh, p.attn_l + bh);",
                "  }",
                "}",
            ),
        ),
    ),
    Kind.ATTN_MERGE: (
        "attn_merge",
        Loop(
            "ATTN_MERGE (g): for the heads of KV head g, M = max_part m_part and\n"
            "  attn = sum_part exp(m_part - M) o_part / sum_part exp(m_part - M) l_part   (part = 0..P-1 in order)",
            (
                "const int g = t.a;",
                "for (int i = threadIdx.x; i < B * G * D; i += THREADS) {",
                "  const int b = i / (G * D), h = g * G + (i / D) % G, el = i % D;",
                "  const int bh = (b * HQ + h) * P;  // attn_m[b, h, 0]",
                "  float mx = -INFINITY, num = 0.f, den = 0.f;",
                "  for (int k = 0; k < P; ++k) mx = fmaxf(mx, ld_act(p.attn_m + bh + k));",
                "  for (int k = 0; k < P; ++k) {",
                "    const float a = expf(ld_act(p.attn_m + bh + k) - mx);  // 0 for an empty partition",
                "    num += a * ld_act(p.attn_o + static_cast<size_t>(bh + k) * D + el);",
                "    den += a * ld_act(p.attn_l + bh + k);",
                "  }",
                "  p.attn[b * QD + h * D + el] = num / den;  // den >= 1: the maximal partition has l >= 1",
                "}",
            ),
        ),
    ),
    Kind.OPROJ_RESIDUAL: (
        "oproj_residual",
        Matvec(
            "OPROJ_RESIDUAL (r0, r1): x[b, r] += attn[b] . Wo[r] for rows r in [r0, r1)",
            ("const int r0 = t.a, r1 = t.b;", LAYER),
            "QD",
            "p.attn",
            "QD",
            "nullptr",
            "r1 - r0",
            ("return w.o_proj + static_cast<size_t>(r0 + v) * QD;",),
            (
                "float* xr = p.x + b * H + r0 + v;",
                "*xr = ld_act(xr) + y[v * B + b];",
            ),
        ),
    ),
    Kind.GATE_UP_SILU: (
        "gate_up_silu",
        Matvec(
            "GATE_UP_SILU (r0, r1): h = rms(x[b]) * w_post;  act[b, r] = silu(Wg[r] . h) * (Wu[r] . h),\n"
            "  silu(z) = z / (1 + exp(-z)); the task's matvec rows are its n gate rows, then its n up rows",
            ("const int r0 = t.a, n = t.b - t.a;", LAYER),
            "H",
            "p.x",
            "H",
            "w.post_attention_layernorm",
            "2 * n",
            (
                "return v < n ? w.gate_proj + static_cast<size_t>(r0 + v) * H",
                "             : w.up_proj + static_cast<size_t>(r0 + v - n) * H;",
            ),
            (
                "const float gate = y[v * B + b], up = y[(v + n) * B + b];",
                "p.act[b * I + r0 + v] = gate / (1.f + expf(-gate)) * up;",
            ),
            outputs="n",
        ),
    ),
    Kind.DOWN_PARTIAL: (
        "down_partial",
        Matvec(
            "DOWN_PARTIAL (r0, r1, k): down[k, b, r] = act[b, k*CI : (k+1)*CI] . Wd[r, k*CI : (k+1)*CI]",
            ("const int r0 = t.a, r1 = t.b, k = t.c;", LAYER),
            "CI",
            "p.act + k * CI",
            "I",
            "nullptr",
            "r1 - r0",
            ("return w.down_proj + static_cast<size_t>(r0 + v) * I + k * CI;",),
            ("p.down[(static_cast<size_t>(k) * B + b) * H + r0 + v] = y[v * B + b];",),
        ),
    ),
    Kind.DOWN_RESIDUAL: (
        "down_residual",
        Loop(
            "DOWN_RESIDUAL (r0, r1): x[b, r] += (down[0, b, r] + ... + down[KS-1, b, r]), chunks summed in order",
            (
                "const int r0 = t.a, n = t.b - t.a;",
                "for (int i = threadIdx.x; i < B * n; i += THREADS) {",
                "  const int b = i / n, r = r0 + i % n;",
                "  float s = ld_act(p.down + b * H + r);",
                "  for (int k = 1; k < KS; ++k) s += ld_act(p.down + (static_cast<size_t>(k) * B + b) * H + r);",
                "  p.x[b * H + r] = ld_act(p.x + b * H + r) + s;",
                "}",
            ),
        ),
    ),
    Kind.LMHEAD_ARGMAX: (
        "lmhead_argmax",
        Matvec(
            "LMHEAD_ARGMAX (tile): logits[b, v] = W[v] . (rms(x[b]) * w_norm) for the vocabulary rows of\n"
            "  the tile, [tile*CV, min((tile+1)*CV, V)) (never empty); (amax_val, amax_idx)[b, tile] = the\n"
            "  tile's maximum, first index on ties",
            ("const int tile = t.a, v0 = tile * CV, n = min(CV, V - v0);",),
            "H",
            "p.x",
            "H",
            "p.norm",
            "n",
            ("return p.lm_head + static_cast<size_t>(v0 + v) * H;",),
            ("p.logits[b * V + v0 + v] = y[v * B + b];",),
            (
                "// tile maximum: warp w takes batch rows w, w + NWARPS, ...; lanes scan rows in order, then butterfly",
                "for (int b = warp_id(); b < B; b += NWARPS) {",
                "  ArgMax best{-INFINITY, static_cast<i64>(V)};  // V: no element yet",
                "  for (int v = lane_id(); v < n; v += 32) best = argmax_pick(best, ArgMax{y[v * B + b], v0 + v});",
                "  best = warp_argmax(best);",
                "  if (lane_id() == 0) {",
                "    p.amax_val[b * NT + tile] = best.val;",
                "    p.amax_idx[b * NT + tile] = best.idx < V ? best.idx : v0;  // all NaN: still a valid index",
                "  }",
                "}",
            ),
        ),
    ),
    Kind.ARGMAX_REDUCE: (
        "argmax_reduce",
        Loop(
            "ARGMAX_REDUCE (): token[b] = the first maximum over tiles 0..NT-1; tokens_out[step, b] = token[b]",
            (
                "for (int b = warp_id(); b < B; b += NWARPS) {",
                "  ArgMax best{-INFINITY, static_cast<i64>(V)};",
                "  for (int k = lane_id(); k < NT; k += 32)",
                "    best = argmax_pick(best, ArgMax{ld_act(p.amax_val + b * NT + k), __ldcg(p.amax_idx + b * NT + k)});",
                "  best = warp_argmax(best);",
                "  if (lane_id() == 0) {",
                "    const i64 tok = best.idx < V ? best.idx : 0;",
                "    p.token[b] = tok;",
                "    p.tokens_out[static_cast<size_t>(step) * B + b] = tok;",
                "  }",
                "}",
            ),
        ),
    ),
}


def render_matvec(e: Emitter, r: Matvec) -> None:
    uses_layer = any("w." in ln for ln in (*r.epilogue, *r.after, r.norm))  # weights: the ring
    e.lines(*(ln for ln in r.setup if ln != LAYER or uses_layer))
    e.line(f"matvec<{r.k}>({r.rows}, {r.src}, {r.ld}, {r.norm}, sm, ring);")
    e.line("const float* y = sm.f + XS_FLOATS;  // outputs y[v * B + b], complete and visible")
    with e.block(f"for (int i = threadIdx.x; i < ({r.outputs or r.rows}) * B; i += THREADS)"):
        e.line("const int v = i / B, b = i % B;")
        e.lines(*r.epilogue)
    e.lines(*r.after)


def render_load(e: Emitter, name: str, r: Matvec) -> None:
    """The producer function of a Matvec kind: the task's weight rows into the ring."""
    e.comment(f"producer of {name}: its weight rows, in the order {name} reads them")
    with e.block(f"static __device__ __forceinline__ void load_{name}{LOAD_SIGNATURE}"):
        e.lines(*r.setup)
        with e.block("const auto row = [&](int v) -> const bf16*", close="};"):
            e.lines(*r.row)
        e.line(f"load_matvec<{r.k}>(row, {r.rows}, sm, ring);")


def render_device(e: Emitter, kind: Kind) -> None:
    """The `__device__` function(s) of `kind`: its semantics as a comment, then its body (and,
    for a Matvec kind, its producer)."""
    name, r = RULES[kind]
    e.comment(r.doc)
    with e.block(f"static __device__ __forceinline__ void {name}{SIGNATURE}"):
        if isinstance(r, Matvec):
            render_matvec(e, r)
        else:
            e.lines(*r.body)
    if isinstance(r, Matvec):
        render_load(e, name, r)
    e.blank()


def function_name(kind: Kind) -> str:
    return RULES[kind][0]


def streams_weights(kind: Kind) -> bool:
    """Whether the producer warp streams weights for tasks of `kind` (`load_<name>` exists)."""
    return isinstance(RULES[kind][1], Matvec)
