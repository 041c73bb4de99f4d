"""Hypothesis strategies that draw fuzz cases of every public Python entry point of foveal.

Each strategy draws a (label, setup, call) triple of Python source (see driver.py): shapes
with 0, 1 and huge extents (2**31 .. 2**62, through zero-stride views so nothing is
allocated), dtypes (float32/64, float16, ints, bool, complex, torch bfloat16; the attention,
cache and paged strategies draw the 16-bit storage types in tame cases too, and check an
accepted 16-bit attention call against the float32 call on the widened inputs), memory layouts
(negative, zero, overlapping, non-contiguous strides; read-only), NaN/inf values, option values
(negative, huge, wrong types) and aliasing (``out=q`` and the like). Shapes are mostly
consistent so that cases reach the kernels, with one argument perturbed now and then.

KNOWN lists findings that are reported and being fixed elsewhere (branch ``harden``); the
strategies do not draw the inputs that trigger them while a finding is listed here. Delete an
entry to fuzz those inputs again once the fix is merged.
"""

from __future__ import annotations

from hypothesis import strategies as st

KNOWN: dict[str, str] = {}

HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]
HUGE_NEGATIVE = [-(2**31), -(2**62), -(2**63)]
# Huge extents of views: every stride 0, so any size numpy accepts (< 2**63 bytes) is free.
HUGE_EXTENTS = [2**31 + 1, 2**40, 2**58]
WRONG_TYPES = ["1.5", "'3'", "None", "True", "[1]", "np.float64(2.0)"]
FLOATS = [
    "0.0",
    "1.0",
    "0.125",
    "-1.0",
    "float('nan')",
    "float('inf')",
    "-float('inf')",
    "1e-300",
    "1e300",
    "5e-324",
]
LAYOUTS = ["c", "c", "c", "f", "swap", "neg", "negin", "step", "stepin", "zero", "overlap"]
LAYOUTS += ["readonly"]
FILLS = ["randn", "randn", "randn", "zeros", "nan", "inf", "-inf", "mixed", "huge", "tiny"]
DTYPES = ["float32", "float32", "float64", "float64", "float16", "int64", "int32", "bool"]


TAME_LAYOUTS = ["c", "c", "c", "swap", "step", "neg", "readonly"]
# Whether the case being drawn is "wild" (every kind of bad input) or "tame" (valid dtypes,
# layouts and option ranges, so that it reaches the kernels); set by Case for its draws.
_WILD = [True]


def known(name: str) -> bool:
    return name in KNOWN


@st.composite
def int_option(draw, low: int = -2, high: int = 8, wrong: bool = True) -> str:
    """An integer option as source: mostly small, sometimes huge or of a wrong type."""
    kind = draw(st.integers(0, 9))
    if not _WILD[0]:
        return str(draw(st.integers(max(low, -1), high)))
    if kind <= 6:
        return str(draw(st.integers(low, high)))
    if kind == 7 or not wrong:
        return str(draw(st.sampled_from(HUGE + HUGE_NEGATIVE)))
    if kind == 8:
        return f"np.int64({draw(st.integers(low, high))})"
    return draw(st.sampled_from(WRONG_TYPES))


@st.composite
def float_option(draw, usual: str = "0.0") -> str:
    if draw(st.integers(0, 2)) == 0:
        return usual
    if not _WILD[0]:
        return draw(st.sampled_from([usual, "0.5", "2.0", "30.0"]))
    return draw(st.sampled_from(FLOATS + ["'x'", "None", "True", "np.float32(0.5)"]))


@st.composite
def threads(draw) -> str:
    """num_threads: None (global), small, negative, huge, wrong type."""
    choices = ["None", "None", "None", "1", "2", "3", "0", "-1", "'2'", "2.0"]
    if not _WILD[0]:
        return draw(st.sampled_from(choices[:6]))
    if not known("num_threads_huge"):
        choices += ["2**31 - 1", "2**40", "1000"]
    return draw(st.sampled_from(choices))


@st.composite
def flag(draw) -> str:
    if not _WILD[0]:
        return draw(st.sampled_from(["True", "False"]))
    return draw(st.sampled_from(["True", "False", "False", "0", "1", "None", "'yes'"]))


class Case:
    """Collects the setup lines of a case while its arrays and options are drawn."""

    def __init__(self, draw, label: str) -> None:
        self.draw = draw
        self.label = label
        self.lines: list[str] = []
        self.wild = _WILD[0] = draw(st.integers(0, 2)) == 0
        self.lib = draw(st.sampled_from(["np", "np", "np", "torch"]))
        self.dtype = draw(st.sampled_from(DTYPES[:4] + (DTYPES if self.wild else [])))
        if self.wild and self.lib == "torch" and draw(st.integers(0, 9)) == 0:
            self.dtype = "bf16"
        self.seed = 0
        self.huge_dim: str | None = None
        self.calls: list[str] = []

    def maybe_half(self) -> None:
        """Now and then, tame cases too, a 16-bit storage dtype (float16, or torch bfloat16),
        for the entry points that store them; call before drawing arrays."""
        if self.draw(st.integers(0, 3)) == 0:
            torch_bf16 = self.lib == "torch" and self.draw(st.booleans())
            self.dtype = "bf16" if torch_bf16 else "float16"

    def cache_dtype(self) -> str:
        """The dtype= of an owned cache holding elements of the case's dtype."""
        names = {"float32": "float32", "float64": "float64", "float16": "float16"}
        return "bfloat16" if self.dtype == "bf16" else names.get(self.dtype, "float32")

    def dims(self, names: dict, zero_for_huge: tuple = ()) -> dict:
        """Draws the named extents (name -> (low, high)); now and then one of them huge and
        one of `zero_for_huge` 0, so the huge view costs no work."""
        draw = self.draw
        values = {name: draw(st.integers(low, high)) for name, (low, high) in names.items()}
        if zero_for_huge and draw(st.integers(0, 11)) == 0:
            self.huge_dim = draw(st.sampled_from(sorted(names)))
            values[self.huge_dim] = draw(st.sampled_from(HUGE_EXTENTS))
            zeros = [n for n in zero_for_huge if n != self.huge_dim]
            if zeros:
                values[draw(st.sampled_from(zeros))] = 0
            else:
                values[self.huge_dim] = 1
                self.huge_dim = None
        return values

    def array(
        self,
        name: str,
        shape: tuple,
        dtype: str | None = None,
        perturb: bool = True,
        layout: str | None = None,
        fill: str | None = None,
    ) -> str:
        """Adds `name = mk(...)` to the setup; returns name."""
        draw = self.draw
        shape = list(shape)
        if perturb and self.wild and draw(st.integers(0, 14)) == 0:
            what = draw(st.integers(0, 2))
            if what == 0 and shape:
                shape.pop(draw(st.integers(0, len(shape) - 1)))
            elif what == 1:
                shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(0, 3)))
            elif shape:
                shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 5))
        if dtype is None:
            dtype = self.dtype
            if self.wild and draw(st.integers(0, 9)) == 0:
                dtype = draw(st.sampled_from(DTYPES))
        if dtype == "bf16" and self.lib != "torch":
            dtype = "float32"
        huge = any(isinstance(extent, int) and extent > 2**20 for extent in shape)
        if layout is None:
            layouts = LAYOUTS if self.wild else TAME_LAYOUTS
            layout = "zero" if huge else draw(st.sampled_from(layouts))
        if fill is None:
            fill = draw(st.sampled_from(FILLS if self.wild else FILLS[:4]))
        self.seed += 1
        self.lines.append(
            f"{name} = mk(({''.join(f'{extent}, ' for extent in shape)}), {dtype!r}, {layout!r}, {fill!r}, {self.lib!r}, "
            f"{self.seed})"
        )
        return name

    def line(self, text: str) -> None:
        self.lines.append(text)

    def call(self, text: str) -> None:
        """A line of the call part: API calls whose rejection is part of the oracle."""
        self.calls.append(text)

    def out_choice(self, name: str, shape: tuple, aliases: list[str]) -> str:
        """out=: None, a fresh array of the right shape, an alias of an input, a wrong one."""
        kind = self.draw(st.integers(0, 9))
        if kind <= 4:
            return "None"
        if kind <= 6:
            return self.array(name, shape, perturb=kind == 6)
        if kind <= 8 and aliases and self.wild:
            return self.draw(st.sampled_from(aliases))
        if known("overlapping_out"):
            return self.array(name, shape, layout="readonly")
        return self.array(name, shape, layout=self.draw(st.sampled_from(["zero", "overlap"])))

    def done(self, call: str, all_in_call: bool = False) -> tuple[str, str, str]:
        call = "".join(line + "\n" for line in self.calls) + call
        if all_in_call:
            return self.label, "", "\n".join(self.lines) + "\n" + call
        return self.label, "\n".join(self.lines), call


def _kw(**options: str) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items())


def _expect_attention(result: str, shape: str, like: str, return_lse: str) -> str:
    return (
        f"if isinstance({result}, tuple):\n"
        f"    assert {return_lse}, 'a tuple without return_lse'\n"
        f"    expect({result}[0], {shape}, {like})\n"
        f"    expect({result}[1], ({shape})[:3], {like}, lse_dtype({like}))\n"
        f"else:\n"
        f"    assert not {return_lse}, 'no lse with return_lse'\n"
        f"    expect({result}, {shape}, {like})\n"
    )


def _expect_widened(call: str, inputs: str) -> str:
    """Source: the result r of a 16-bit call equals `call` on the widened `inputs` (the
    float32 call), out rounded."""
    return (
        f"if is_half(q) and sum(int(np.prod(t.shape)) for t in ({inputs})) < 2**20:\n"
        f"    {inputs} = (widened(t) for t in ({inputs}))\n"
        "    try:\n"
        f"        single = {call}\n"
        "    except _ALLOWED as error:\n"
        "        raise AssertionError(f'the float32 call rejected it: {error!r}') from None\n"
        "    expect_rounded(r, single)\n"
    )


# --------------------------------------------------------------------------------------------
# Attention.


def _qkv(case: Case, dims: dict) -> str:
    hq = dims["Hkv"] * dims["G"]
    case.array("q", (dims["B"], hq, dims["Lq"], dims["D"]))
    case.array("k", (dims["B"], dims["Hkv"], dims["Lk"], dims["D"]))
    case.array("v", (dims["B"], dims["Hkv"], dims["Lk"], dims["Dv"]))
    return "(q.shape[0], q.shape[1], q.shape[2], v.shape[3])"


ATTENTION_DIMS = {
    "B": (0, 2),
    "Hkv": (0, 3),
    "G": (0, 3),
    "Lq": (0, 6),
    "Lk": (0, 9),
    "D": (0, 9),
    "Dv": (0, 9),
}


@st.composite
def _mask_options(draw, bias_ok: bool = True) -> dict:
    return dict(
        scale=draw(st.one_of(st.just("None"), float_option("None"))),
        causal=draw(flag()),
        window_left=draw(int_option()),
        window_right=draw(int_option()),
        sink_tokens=draw(int_option()),
        softcap=draw(float_option()),
        q_offset=draw(st.one_of(st.just("None"), int_option(-2, 12))),
    )


@st.composite
def _key_ranges(draw, dims: dict) -> dict:
    """key_start / key_length of a variable-length call, as code, each one time in four: about
    B entries, mostly in [0, Lk], sometimes just outside or the largest int64."""
    options = {}
    batch, keys = min(dims["B"], 6), max(0, min(dims["Lk"], 1 << 20))
    for name in ("key_start", "key_length"):
        if draw(st.integers(0, 3)) != 0:
            continue
        count = max(0, batch + draw(st.sampled_from([0, 0, 0, 0, 1, -1])))
        value = st.one_of(
            st.integers(0, keys), st.integers(0, keys), st.integers(-2, 3), st.just(2**63 - 1)
        )
        options[name] = repr([draw(value) for _ in range(count)])
    return options


@st.composite
def attention_case(draw, function: str = "attention"):
    case = Case(draw, function)
    case.maybe_half()
    dims = case.dims(ATTENTION_DIMS, zero_for_huge=("B", "Lq", "Hkv"))
    shape = _qkv(case, dims)
    options = draw(_mask_options())
    if function == "attention" and draw(st.booleans()):
        hq = dims["Hkv"] * dims["G"]
        rank = draw(st.integers(2, 4))
        full = (draw(st.sampled_from([1, dims["B"]])), draw(st.sampled_from([1, hq])))
        full += (dims["Lq"], dims["Lk"])
        dtype = draw(st.sampled_from([case.dtype, case.dtype, "bool", "int64"]))
        options["bias"] = case.array("bias", full[4 - rank :], dtype=dtype)
    options.update(draw(_key_ranges(dims)))
    options["return_lse"] = draw(flag())
    hq = dims["Hkv"] * dims["G"]
    out_shape = (dims["B"], hq, dims["Lq"], dims["Dv"])
    options["out"] = case.out_choice("out", out_shape, ["q", "k", "v"])
    options["num_threads"] = draw(threads())
    call = f"r = foveal.{function}(q, k, v, {_kw(**options)})\n"
    call += _expect_attention("r", shape, "q", options["return_lse"])
    if options["out"] == "None":
        inputs = "q, k, v, bias" if "bias" in options else "q, k, v"
        call += _expect_widened(f"foveal.{function}(q, k, v, {_kw(**options)})", inputs)
    return case.done(call)


@st.composite
def attention_backward_case(draw):
    """attention_backward / sliding_window_attention_backward on drawn forward outputs, or
    foveal.torch.attention's autograd."""
    function = draw(
        st.sampled_from(
            ["attention_backward", "sliding_window_attention_backward", "torch_attention"]
        )
    )
    case = Case(draw, function)
    dims = case.dims(ATTENTION_DIMS, zero_for_huge=("B", "Lq", "Hkv"))
    _qkv(case, dims)
    options = draw(_mask_options())
    options.update(draw(_key_ranges(dims)))
    hq = dims["Hkv"] * dims["G"]
    out_shape = (dims["B"], hq, dims["Lq"], dims["Dv"])
    options["num_threads"] = draw(threads())
    if function == "torch_attention":
        if case.lib != "torch":
            case.lib = "torch"
            case.lines.clear()
            case.seed = 0
            _qkv(case, dims)
        if draw(st.booleans()):  # learned sink logits: the gradient through lse
            options["sink_logits"] = case.array("sinks", (hq,))
        call = (
            "import foveal.torch\n"
            "q, k, v = (t.detach().requires_grad_(t.dtype.is_floating_point) "
            "for t in (q, k, v))\n"
            f"r = foveal.torch.attention(q, k, v, {_kw(**options)})\n"
            "expect(r, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]), q)\n"
            "if r.requires_grad:\n"
            "    r.sum().backward()\n"
            "    for t in (q, k, v):\n"
            "        expect(t.grad, t.shape, q)\n"
        )
        return case.done(call)
    case.array("out", out_shape)
    case.array("lse", out_shape[:3])
    case.array("grad_out", out_shape)
    if function == "attention_backward" and draw(st.booleans()):
        bias_shape = (1, 1, dims["Lq"], dims["Lk"])
        options["bias"] = case.array("bias", bias_shape)
    if draw(st.booleans()):
        options["grad_lse"] = case.array("grad_lse", out_shape[:3])
    call = (
        f"r = foveal.{function}(q, k, v, out, lse, grad_out, {_kw(**options)})\n"
        "assert isinstance(r, tuple) and len(r) == 3, type(r)\n"
        "expect(r[0], q.shape, q)\nexpect(r[1], k.shape, q)\nexpect(r[2], v.shape, q)\n"
    )
    return case.done(call)


@st.composite
def merge_states_case(draw):
    case = Case(draw, "merge_states")
    huge = () if known("merge_states_huge_empty") else ("B", "H", "L")
    d = case.dims({"B": (0, 2), "H": (0, 3), "L": (0, 5), "Dv": (0, 6)}, huge)
    shape = (d["B"], d["H"], d["L"], d["Dv"])
    case.array("out_a", shape)
    case.array("lse_a", shape[:3])
    case.array("out_b", shape)
    case.array("lse_b", shape[:3])
    out = case.out_choice("out", shape, ["out_a", "out_b"])
    lse = case.out_choice("lse", shape[:3], ["lse_a", "lse_b"])
    call = (
        f"r = foveal.merge_states(out_a, lse_a, out_b, lse_b, out={out}, lse={lse}, "
        f"num_threads={draw(threads())})\n"
        "expect(r[0], out_a.shape, out_a)\nexpect(r[1], tuple(out_a.shape)[:3], out_a)\n"
    )
    return case.done(call)


SPARSE_DIMS = {
    "B": (0, 2),
    "Hkv": (0, 2),
    "G": (0, 3),
    "Lq": (0, 70),
    "Lk": (0, 100),
    "D": (0, 8),
    "Dv": (0, 8),
}
# Edits of a BlockSelection or TokenSelection `sel`, most of them breaking it (wrong geometry,
# offsets of the wrong length or not monotone, items out of range or not increasing, wrong
# types); {items} and {extent} name the items (blocks, keys) and their extent (key_blocks, len_k).
SELECTION_EDITS = [
    "sel.block_size = {small}",
    "sel.batch += 1",
    "sel.heads_kv -= 1",
    "sel.first_query_block += {small}",
    "sel.query_blocks += 1",
    "sel.{extent} -= 1",
    "sel.offsets = sel.offsets[:-1]",
    "sel.offsets = np.append(sel.offsets, sel.offsets[-1:])",
    "sel.offsets[{index} % len(sel.offsets)] += 1",
    "sel.offsets = sel.offsets[::-1].copy()",
    "sel.{items} = sel.{items}[::-1].copy()",
    "sel.{items} = np.append(sel.{items}, {huge})",
    "sel.{items}[{index} % max(len(sel.{items}), 1):][:1] = {huge}",
    "sel.{items} = np.repeat(sel.{items}, 2)",
    "sel.{items} = sel.{items}.astype(np.float64) + 0.5",
    "sel.offsets = sel.offsets.reshape(1, -1)",
    "sel.offsets = None",
    "sel.batch = {wrong}",
]


@st.composite
def _fraction(draw) -> str:
    """A budget or threshold: in (0, 1] mostly; else 0, out of range, NaN, a wrong type."""
    usual = ["0.0625", "0.25", "0.5", "1.0"]
    if not _WILD[0] or draw(st.booleans()):
        return draw(st.sampled_from(usual))
    return draw(st.sampled_from(FLOATS + ["1.5", "2**70", "'x'", "None"]))


# What the sparse prefill methods differ in: the entry points, the selection class, the local
# option, the selection's items and extent (vertical_slash selects a TokenSelection).
SPARSE_PREFILL = {
    "block_sparse": (
        "block_sparse_select",
        "block_sparse_attention",
        "BlockSelection",
        "local_blocks",
        "blocks",
        "key_blocks",
    ),
    "token_topk": (
        "token_topk_select",
        "token_topk_attention",
        "TokenSelection",
        "local_tokens",
        "keys",
        "len_k",
    ),
    "vertical_slash": (
        "vertical_slash_select",
        "vertical_slash_attention",
        "TokenSelection",
        "local_tokens",
        "keys",
        "len_k",
    ),
}


@st.composite
def block_sparse_case(draw, method: str = "block_sparse"):
    """<method>_select; <method>_attention in one call, with the selection it made or with one
    from a drawn mask, maybe broken by an edit (accepted: it must follow the selection's rules);
    the selection class's from_mask, mask, kept and density. `method`: block_sparse,
    token_topk or vertical_slash (SPARSE_PREFILL)."""
    select_fn, attend_fn, selection_class, local_name, items, extent = SPARSE_PREFILL[method]
    function = draw(st.sampled_from(["select", "attention", "selection", "mask"]))
    case = Case(draw, f"{method}.{function}")
    case.maybe_half()
    dims = case.dims(SPARSE_DIMS, zero_for_huge=("B", "Lq", "Hkv"))
    shape = _qkv(case, dims)
    options = draw(_mask_options())
    sparse = {
        "budget": draw(_fraction()),
        "threshold": draw(st.sampled_from(["0.0", "0.0", "0.5", "0.9"]) | _fraction()),
        "block_size": draw(st.sampled_from(["16", "16", "32", "48"]) | int_option(-1, 70)),
        local_name: draw(int_option(-1, 3) if method == "block_sparse" else int_option(-1, 70)),
    }
    if method == "vertical_slash":
        sparse["last_queries"] = draw(int_option(-1, 70))
    if method == "token_topk":
        sparse["outliers"] = draw(st.sampled_from(["1", "1", "0", "2"]) | int_option(-1, 70))
    threads_ = draw(threads())
    hkv, qb = dims["Hkv"], draw(st.integers(0, 3))
    kb = draw(st.integers(0, 4)) if method == "block_sparse" else dims["Lk"]
    index, small = draw(st.integers(0, 9)), draw(st.sampled_from(["8", "17", "4097", "-16"]))
    edit = draw(st.sampled_from(SELECTION_EDITS)).format(
        items=items,
        extent=extent,
        small=small,
        index=index,
        huge=draw(st.sampled_from(["-1", "2**40", "-(2**63)"])),
        wrong=draw(st.sampled_from(WRONG_TYPES)),
    )
    inspect = (
        "for method, args in ((sel.mask, ()), (sel.density, ()), "
        "(sel.kept, (0, 0, sel.first_query_block))):\n"
        "    attempt(method, *args)\n"
        "repr(sel)\n"
    )
    if function == "mask":
        case.array(
            "mask",
            (dims["B"], hkv, qb, kb),
            dtype=draw(st.sampled_from(["bool", "bool", "bool", "int64", "float32"])),
        )
        call = (
            f"sel = foveal.{selection_class}.from_mask(mask, block_size={sparse['block_size']}, "
            f"first_query_block={draw(int_option(-2, 3))})\n"
            "m = sel.mask()\n"
            "assert m.dtype == bool and m.shape == tuple(mask.shape), (m.dtype, m.shape)\n"
            "assert (m == np.asarray(mask)).all(), 'from_mask(m).mask() != m'\n"
            "assert 0 <= sel.density() <= 1\n"
            f"attempt(sel.kept, {draw(int_option(-1, 2))}, {draw(int_option(-1, 2))}, "
            f"{draw(int_option(-1, 3))})\n"
        )
        if draw(st.booleans()):
            call += f"{edit}\n{inspect}"
        return case.done(call)
    select = f"foveal.{select_fn}(q, k, {_kw(**sparse, **options)}, num_threads={threads_})"
    attend = _kw(**options)
    if function == "select":
        call = (
            f"sel = {select}\n"
            f"assert selection_ok(sel, q, k, {options['q_offset']}), 'a malformed selection'\n"
            "assert 0 <= sel.density() <= 1\n"
        )
        return case.done(call + inspect)
    return_lse = draw(flag())
    out_shape = (dims["B"], hkv * dims["G"], dims["Lq"], dims["Dv"])
    out = case.out_choice("out", out_shape, ["q", "k", "v"])
    if function == "attention":
        call = f"r = foveal.{attend_fn}(q, k, v, {_kw(**sparse)}, {attend}, "
        call += f"return_lse={return_lse}, out={out}, num_threads={threads_})\n"
        call += _expect_attention("r", shape, "q", return_lse)
        if out == "None":
            call += _expect_widened(
                f"foveal.{attend_fn}(q, k, v, {_kw(**sparse)}, {attend}, return_lse={return_lse})",
                "q, k, v",
            )
        return case.done(call)
    # With a selection: the one block_sparse_select made (any options), one from a random mask
    # of its geometry, or one from a mask of a drawn geometry; then maybe an edit.
    source = draw(st.sampled_from(["selected", "selected", "remasked", "remasked", "mask"]))
    if source == "mask":
        case.array("mask", (dims["B"], hkv, qb, kb), dtype="bool", perturb=False)
        case.call(
            f"sel = foveal.{selection_class}.from_mask(mask, block_size={sparse['block_size']}, "
            f"first_query_block={draw(int_option(-2, 3))})"
        )
    else:
        case.call(f"sel = {select}")
    if source == "remasked":
        case.call(
            f"sel = foveal.{selection_class}.from_mask(np.random.default_rng({index}).random("
            "sel.mask().shape) < 0.5, block_size=sel.block_size, "
            "first_query_block=sel.first_query_block)"
        )
    if draw(st.integers(0, 2)) == 0:
        case.call(edit)
    kept = f"out={out}, return_lse={return_lse}, num_threads={draw(threads())}"
    call = (
        "before = None if {out} is None else _float32_numpy({out}).tobytes()\n"
        "try:\n"
        "    r = foveal.{attend_fn}(q, k, v, selection=sel, {attend}, {kept})\n"
        "except _ALLOWED:\n"
        "    assert before is None or _float32_numpy({out}).tobytes() == before, "
        "'a rejected call wrote out'\n"
        "    raise\n"
        "assert selection_ok(sel, q, k, {q_offset}) is not False, 'accepted a malformed selection'\n"
    ).format(q_offset=options["q_offset"], out=out, attend=attend, kept=kept, attend_fn=attend_fn)
    call += _expect_attention("r", shape, "q", return_lse)
    if out == "None":
        call += _expect_widened(
            f"foveal.{attend_fn}(q, k, v, selection=sel, {attend}, return_lse={return_lse})",
            "q, k, v",
        )
    return case.done(call)


@st.composite
def kv_cache_case(draw, quest: bool = False):
    """A cache (owned or wrapped) and a sequence of operations on it, decode among them; a
    rejected operation must leave the lengths unchanged. With `quest`: a cache with page bounds
    (of drawn page sizes, good or bad), quest_decode_attention and refresh_page_bounds after an
    in-place edit of wrapped keys among the operations; after each one the page bounds must be
    the min / max of the stored keys, and a rejected one must leave them unchanged too."""
    case = Case(draw, "KVCache(page_bounds)+quest" if quest else "KVCache+decode_attention")
    d = case.dims(
        {"B": (0, 2), "Hkv": (0, 2), "C": (0, 12 if quest else 6), "D": (1, 6), "Dv": (0, 6)},
        ("B", "Hkv"),
    )
    ring, sinks = draw(flag()), draw(int_option(-1, 4))
    bytes_storage = False  # a wrapped 8-bit cache over uint8 blocks
    bounds = ""
    if quest:
        page = draw(st.sampled_from(["1", "2", "3", "4", "16", "2**30"]) | int_option(-1, 4))
        bounds = f", page_bounds={page}"
    case.maybe_half()
    dtype = case.cache_dtype()
    wrapped = draw(st.booleans())
    if not wrapped and dtype == "float32" and draw(st.integers(0, 3)) == 0:
        dtype = "int8"  # the 8-bit cache: takes float32 like a float32 one
    if not wrapped:
        sizes = [str(d[n]) for n in ("B", "Hkv", "C", "D", "Dv")]
        if draw(st.integers(0, 5)) == 0:
            sizes[draw(st.integers(0, 4))] = draw(int_option())
        case.call(
            f"cache = foveal.KVCache({', '.join(sizes)}, dtype={dtype!r}, ring={ring}, "
            f"sink_tokens={sinks}{bounds})"
        )
    else:
        if dtype == "float32" and draw(st.integers(0, 3)) == 0:
            # 8-bit storage: uint8 bytes of 36 per block (random bytes: any scale, NaN included)
            blocks, blocks_v = draw(st.integers(0, 2)), draw(st.integers(0, 2))
            case.array("keys", (d["B"], d["Hkv"], d["C"], blocks, 36), dtype="uint8")
            case.array("values", (d["B"], d["Hkv"], d["C"], blocks_v, 36), dtype="uint8")
            d["D"], d["Dv"] = 32 * max(blocks, 1), 32 * blocks_v
            bytes_storage = True
        else:
            case.array("keys", (d["B"], d["Hkv"], d["C"], d["D"]))
            case.array("values", (d["B"], d["Hkv"], d["C"], d["Dv"]))
        choices = ["None", "[]", "[0]", "[1, 2]", "[3]", "[-1]", "[2**62]"]
        if not known("ring_length_overflow"):
            choices.append("[2**63 - 1]")
        lengths = draw(st.sampled_from(choices))
        case.call(
            f"cache = foveal.KVCache.wrap(keys, values, ring={ring}, sink_tokens={sinks}, "
            f"lengths={lengths}{bounds})"
        )
    call = [
        "state = lambda: (cache.lengths, [cache.first_retained(b) for b in range(cache.batch)]"
        + (", cache.page_bounds.tobytes())" if quest else ")")
    ]
    ops = ["append", "append", "decode", "decode", "truncate", "misc"]
    ops += ["quest", "quest", "refresh"] if quest else []
    for step in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(ops))
        if op == "append":
            n = draw(st.integers(0, 4))
            empty = d["B"] == 0 or d["Hkv"] == 0
            if empty and not known("ring_append_huge_n") and draw(st.integers(0, 5)) == 0:
                n = 2**40  # an empty k of a huge n: no work may depend on n
            k = case.array(f"k{step}", (d["B"], d["Hkv"], n, d["D"]))
            v = case.array(f"v{step}", (d["B"], d["Hkv"], n, d["Dv"]))
            counts = draw(
                st.sampled_from(["None", "None", "[1]", "[0, 1]", "[-1, 9]", "[2**63-1]"])
            )
            if draw(st.integers(0, 9)) == 0:
                v = draw(st.sampled_from(["cache.keys", "cache.values", k]))
            call.append(f"attempt(cache.append, {k}, {v}, counts={counts}, state=state)")
        elif op in ("decode", "quest"):
            g, lq = draw(st.integers(0, 3)), draw(st.integers(0, 3))
            shape = (d["B"], d["Hkv"] * g, lq, d["D"])
            q = case.array(f"q{step}", shape)
            opts = draw(_mask_options())
            del opts["q_offset"]
            opts["return_lse"] = draw(flag())
            opts["out"] = case.out_choice(
                f"out{step}", (d["B"], d["Hkv"] * g, lq, d["Dv"]), [q, "cache.keys"]
            )
            opts["num_threads"] = draw(threads())
            function = "decode_attention"
            if op == "quest":
                function = "quest_decode_attention"
                opts["budget"] = draw(_fraction())
                opts["local_pages"] = draw(st.sampled_from(["2**40"]) | int_option(-1, 4))
            call.append(f"r = attempt(foveal.{function}, {q}, cache, {_kw(**opts)}, state=state)")
            call.append(
                "if r is not None:\n    "
                + _expect_attention(
                    "r", f"tuple({q}.shape[:3]) + (cache.dim_v,)", q, opts["return_lse"]
                ).replace("\n", "\n    ")
            )
        elif op == "truncate":
            length = draw(int_option(-1, 6))
            seq = draw(st.sampled_from(["None", "0", "1", "-1", "2**62"]))
            call.append(f"attempt(cache.truncate, {length}, sequence={seq}, state=state)")
        elif op == "refresh":
            if wrapped and not bytes_storage:  # a stored key edited in place first
                value = draw(st.sampled_from(["7.5", "-3.0", "float('nan')", "float('inf')"]))
                call.append(
                    "if np.prod(keys.shape) > 0 and getattr(getattr(keys, 'flags', None), "
                    "'writeable', True):\n"
                    f"    keys[0, 0, {draw(st.integers(0, 9))} % keys.shape[2], 0] = {value}"
                )
            call.append("cache.refresh_page_bounds()")
        else:
            call.append(
                draw(
                    st.sampled_from(
                        [
                            "cache.reset()",
                            f"attempt(cache.first_retained, {draw(int_option())})",
                            "repr(cache); cache.keys.shape; cache.values.shape",
                            "cache.page_size; cache.page_bounds.shape",
                        ]
                    )
                )
            )
        if quest:
            call.append("check_page_bounds(cache)")
    return case.done("\n".join(call) + "\n")


@st.composite
def paged_cache_case(draw):
    """A paged cache (owned, or over a [P, 2, Hkv, page, D] pool or an 8-bit [P, 2, Hkv, page,
    blocks, 36] uint8 one) and a sequence of operations on it, batch decode and prefill among them; a rejected operation must leave every
    sequence, page table and the free pages as they were."""
    case = Case(draw, "PagedKVCache+batch_attention")
    d = case.dims({"P": (0, 6), "page": (1, 4), "Hkv": (1, 2), "D": (1, 6), "Dv": (0, 6)}, ("P",))
    case.maybe_half()
    dtype = case.cache_dtype()
    owned = draw(st.booleans())
    if owned and dtype == "float32" and draw(st.integers(0, 3)) == 0:
        dtype = "int8"  # the 8-bit pool: takes float32 like a float32 one
    if owned:
        sizes = [str(d[n]) for n in ("P", "page", "Hkv", "D", "Dv")]
        if draw(st.integers(0, 5)) == 0:
            sizes[draw(st.integers(0, 4))] = draw(int_option())
        case.call(f"cache = foveal.PagedKVCache({', '.join(sizes)}, dtype={dtype!r})")
    else:
        if dtype == "float32" and draw(st.integers(0, 3)) == 0:
            # An 8-bit pool: uint8 bytes of 36 per block of 32 values (random bytes: any scale,
            # NaN included); it takes float32 like a float32 one.
            blocks = draw(st.integers(0, 2))
            case.array("pool", (d["P"], 2, d["Hkv"], d["page"], blocks, 36), dtype="uint8")
            d["D"] = 32 * max(blocks, 1)
        else:
            case.array("pool", (d["P"], 2, d["Hkv"], d["page"], d["D"]))
        case.call("cache = foveal.PagedKVCache.wrap(pool)")
        d["Dv"] = d["D"]
    call = [
        "state = lambda: (cache.sequences, [(cache.length(s), cache.page_table(s)) "
        "for s in cache.sequences], cache.free_pages)",
        "ids = [cache.add_sequence(), cache.add_sequence()]",
    ]
    id_lists = ["ids", "ids[:1]", "ids[1:]", "[ids[0], ids[0]]", "[ids[0], 99]", "[-1]", "[]"]
    one_id = ["ids[0]", "ids[1]", "ids[-1]", "99", "-1", "2**62"]
    for step in range(draw(st.integers(1, 7))):
        op = draw(st.sampled_from(["append", "append", "decode", "prefill", "fork", "cut", "misc"]))
        sequences = draw(st.sampled_from(id_lists))
        count = {"ids": 2, "ids[:1]": 1, "ids[1:]": 1, "[-1]": 1, "[]": 0}.get(sequences, 2)
        if op in ("append", "prefill"):
            n = draw(st.integers(0, 4))
            k = case.array(f"k{step}", (count, d["Hkv"], n, d["D"]))
            v = case.array(f"v{step}", (count, d["Hkv"], n, d["Dv"]))
            counts = draw(
                st.sampled_from(["None", "None", "[1, 0]", "[0]", "[-1, 9]", "[2**63-1]"])
            )
            if op == "append":
                call.append(
                    f"attempt(cache.append, list({sequences}), {k}, {v}, counts={counts}, "
                    "state=state)"
                )
            else:
                g = draw(st.integers(0, 2))
                q = case.array(f"q{step}", (count, d["Hkv"] * g, n, d["D"]))
                call.append(
                    f"r = attempt(foveal.batch_prefill_attention, {q}, {k}, {v}, cache, "
                    f"list({sequences}), counts={counts}, causal={draw(flag())}, "
                    f"num_threads={draw(threads())}, state=state)"
                )
                call.append(
                    f"assert r is None or tuple(r.shape) == tuple({q}.shape[:3]) + (cache.dim_v,)"
                )
        elif op == "decode":
            g, lq = draw(st.integers(0, 3)), draw(st.integers(0, 3))
            q = case.array(f"q{step}", (count, d["Hkv"] * g, lq, d["D"]))
            opts = draw(_mask_options(bias_ok=False))
            del opts["q_offset"]
            opts["return_lse"] = draw(flag())
            opts["share_prefixes"] = draw(flag())
            opts["out"] = case.out_choice(
                f"out{step}", (count, d["Hkv"] * g, lq, d["Dv"]), [q, "cache.keys"]
            )
            opts["num_threads"] = draw(threads())
            call.append(
                f"r = attempt(foveal.batch_decode_attention, {q}, cache, list({sequences}), "
                f"{_kw(**opts)})"
            )
            call.append(
                "if r is not None:\n    "
                + _expect_attention(
                    "r", f"tuple({q}.shape[:3]) + (cache.dim_v,)", q, opts["return_lse"]
                ).replace("\n", "\n    ")
            )
        elif op == "fork":
            call.append(
                f"r = attempt(cache.fork, {draw(st.sampled_from(one_id))}, state=state)\n"
                "if r is not None:\n    ids.append(r)"
            )
        elif op == "cut":
            seq = draw(st.sampled_from(one_id))
            cut = draw(st.sampled_from(["truncate", "remove", "release"]))
            if cut == "truncate":
                call.append(
                    f"attempt(cache.truncate, {seq}, {draw(int_option(-1, 6))}, state=state)"
                )
            elif cut == "release":  # pages a window no longer sees; later calls may see them
                begin, end = draw(int_option(-1, 6)), draw(int_option(-1, 12))
                call.append(f"attempt(cache.release, {seq}, {begin}, {end}, state=state)")
            else:
                call.append(f"attempt(cache.remove, {seq}, state=state)")
        else:
            call.append(
                draw(
                    st.sampled_from(
                        [
                            f"attempt(cache.length, {draw(st.sampled_from(one_id))})",
                            f"attempt(cache.page_table, {draw(st.sampled_from(one_id))})",
                            f"attempt(cache.holds, {draw(st.sampled_from(one_id))}, "
                            f"{draw(int_option(-1, 8))})",
                            f"attempt(cache.references, {draw(int_option(-1, 8))})",
                            "repr(cache); cache.keys.shape; cache.pages_in_use; cache.bytes_in_use",
                        ]
                    )
                )
            )
    return case.done("\n".join(call) + "\n")


@st.composite
def make_attention_case(draw):
    case = Case(draw, "make_attention")
    name = draw(st.sampled_from(["dense", "sliding_window", "sparsek", "sparsek", "nope", ""]))
    options = draw(_mask_options())
    options["num_threads"] = draw(threads())
    params = {}
    for key in draw(st.lists(st.sampled_from(["topk", "window", "gate", "junk"]), max_size=3)):
        params[key] = draw(
            st.sampled_from(["1", "3", "0", "-1", "2**62", "'value'", "'kv'", "'x'", "1.5"])
        )
    options.update(params)
    case.call(f"kernel = foveal.make_attention({name!r}, {_kw(**options)})")
    dims = case.dims(ATTENTION_DIMS, zero_for_huge=("B", "Lq", "Hkv"))
    shape = _qkv(case, dims)
    extras = ""
    if name == "sparsek" or draw(st.integers(0, 4)) == 0:
        case.array("u", (dims["B"], dims["Hkv"], dims["Lk"]))
        extras = ", " + draw(st.sampled_from(["u=u", "scores=u", "u=u", "u=q"]))
    bias = "None"
    if draw(st.integers(0, 3)) == 0:
        bias = case.array("bias", (dims["Lq"], dims["Lk"]))
    return_lse = draw(flag())
    hq = dims["Hkv"] * dims["G"]
    out = case.out_choice("out", (dims["B"], hq, dims["Lq"], dims["Dv"]), ["q"])
    call = f"r = kernel(q, k, v, bias={bias}, return_lse={return_lse}, out={out}{extras})\n"
    call += "repr(kernel); kernel.name\n" + _expect_attention("r", shape, "q", return_lse)
    return case.done(call)


@st.composite
def sparsek_attention_case(draw):
    """sparsek_attention, its backward on drawn forward outputs, or the torch op's autograd."""
    function = draw(
        st.sampled_from(
            ["sparsek_attention", "sparsek.sparsek_attention_backward", "torch_sparsek_attention"]
        )
    )
    case = Case(draw, function)
    dims = case.dims(ATTENTION_DIMS, zero_for_huge=("B", "Lq", "Hkv"))
    if function == "torch_sparsek_attention":
        case.lib = "torch"
    case.maybe_half()
    shape = _qkv(case, dims)
    case.array("u", (dims["B"], dims["Hkv"], dims["Lk"]))
    out_shape = (dims["B"], dims["Hkv"] * dims["G"], dims["Lq"], dims["Dv"])
    options = dict(
        window=draw(int_option(-1, 5)),
        sink_tokens=draw(int_option(-1, 4)),
        gate=draw(st.sampled_from(["'value'", "'kv'", "'none'", "'x'", "None"])),
        causal=draw(flag()),
        scale=draw(st.one_of(st.just("None"), float_option("None"))),
        softcap=draw(float_option()),
        q_offset=draw(st.one_of(st.just("None"), int_option(-2, 12))),
        num_threads=draw(threads()),
    )
    topk = draw(int_option(-1, 10))
    if function == "torch_sparsek_attention":
        call = (
            "import foveal.torch\n"
            "q, k, v, u = (t.detach().requires_grad_(t.dtype.is_floating_point) "
            "for t in (q, k, v, u))\n"
            f"r = foveal.torch.sparsek_attention(q, k, v, u, {topk}, {_kw(**options)})\n"
            "expect(r, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]), q)\n"
            "if r.requires_grad:\n"
            "    r.sum().backward()\n"
            "    for t in (q, k, v, u):\n"
            "        expect(t.grad, t.shape, q)\n"
        )
        return case.done(call)
    if function == "sparsek.sparsek_attention_backward":
        case.array("out", out_shape)
        case.array("lse", out_shape[:3])
        case.array("grad_out", out_shape)
        options["score_grad"] = draw(flag())
        call = (
            f"r = foveal.{function}(q, k, v, u, out, lse, grad_out, {topk}, {_kw(**options)})\n"
            "assert isinstance(r, tuple) and len(r) == 4, type(r)\n"
            "expect(r[0], q.shape, q)\nexpect(r[1], k.shape, q)\nexpect(r[2], v.shape, q)\n"
            "if r[3] is not None:\n    expect(r[3], u.shape, q)\n"
        )
        return case.done(call)
    options["return_lse"] = draw(flag())
    options["out"] = case.out_choice("out", out_shape, ["q", "k"])
    call = f"r = foveal.sparsek_attention(q, k, v, u, {topk}, {_kw(**options)})\n"
    call += _expect_attention("r", shape, "q", options["return_lse"])
    return case.done(call)


# --------------------------------------------------------------------------------------------
# SPARSEK functions and the SparseK cache.


@st.composite
def sparsek_functions_case(draw):
    function = draw(
        st.sampled_from(["sparsek", "sparsek_backward", "sparsek_select", "prefix_thresholds"])
        | st.just("linear_scores")
    )
    case = Case(draw, f"sparsek.{function}")
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0, 6)) for _ in range(rank))
    threads_ = draw(threads())
    if function == "sparsek":
        case.array("z", shape)
        k, tau = draw(int_option(-1, 8)), draw(flag())
        out = case.out_choice("out", shape, ["z"])
        call = f"r = foveal.sparsek.sparsek(z, {k}, return_tau={tau}, out={out}, "
        call += f"num_threads={threads_})\n"
        call += "p = r[0] if isinstance(r, tuple) else r\nexpect(p, z.shape, z)\n"
        call += "if isinstance(r, tuple): expect(r[1], tuple(z.shape)[:-1], z)\n"
    elif function == "sparsek_backward":
        case.array("p", shape)
        case.array("g", shape)
        call = f"r = foveal.sparsek.sparsek_backward(p, g, num_threads={threads_})\n"
        call += "expect(r, p.shape, p)\n"
    elif function == "prefix_thresholds":
        case.array("z", shape)
        k, evicted = draw(int_option(-1, 8)), draw(flag())
        call = f"r = foveal.sparsek.prefix_thresholds(z, {k}, return_evicted={evicted}, "
        call += f"num_threads={threads_})\n"
        call += "t = r[0] if isinstance(r, tuple) else r\nexpect(t, z.shape, z)\n"
        call += "if isinstance(r, tuple): expect(r[1], z.shape, z, 'int64')\n"
    elif function == "sparsek_select":
        d = case.dims({"B": (0, 2), "H": (0, 2), "L": (0, 8)}, ("B", "H"))
        case.array("u", (d["B"], d["H"], d["L"]))
        topk, len_q = draw(int_option(-1, 6)), draw(int_option(-1, 8))
        opts = dict(
            window=draw(int_option(-1, 4)),
            sink_tokens=draw(int_option(-1, 3)),
            causal=draw(flag()),
            q_offset=draw(st.one_of(st.just("None"), int_option(-2, 10))),
            num_threads=threads_,
        )
        call = f"r = foveal.sparsek.sparsek_select(u, {topk}, {len_q}, {_kw(**opts)})\n"
        call += f"expect(r[0], tuple(u.shape[:2]) + ({len_q}, {topk}), u, 'int64')\n"
        call += f"expect(r[1], tuple(u.shape[:2]) + ({len_q}, {topk}), u)\n"
    else:
        d = case.dims({"B": (0, 2), "L": (0, 6), "Dm": (0, 6), "H": (0, 3)}, ("B", "L", "H"))
        case.array("x", (d["B"], d["L"], d["Dm"]))
        case.array("w", (d["H"], d["Dm"]))
        call = f"r = foveal.sparsek.linear_scores(x, w, slope={draw(float_option())}, "
        call += f"num_threads={threads_})\nexpect(r, (x.shape[0], w.shape[0], x.shape[1]), x)\n"
    return case.done(call)


@st.composite
def sparsek_cache_case(draw):
    case = Case(draw, "SparseKCache")
    d = case.dims({"B": (0, 2), "Hkv": (0, 2), "D": (0, 5), "Dv": (0, 5)}, ("B", "Hkv"))
    case.maybe_half()
    dtype = case.cache_dtype()
    sizes = [str(d[n]) for n in ("B", "Hkv", "D", "Dv")]
    if draw(st.integers(0, 5)) == 0:
        sizes[draw(st.integers(0, 3))] = draw(int_option())
    options = dict(
        topk=draw(int_option(-1, 5)),
        window=draw(int_option(-1, 4)),
        sink_tokens=draw(int_option(-1, 3)),
        gate=draw(st.sampled_from(["'value'", "'kv'", "'none'", "'x'"])),
        scale=draw(st.one_of(st.just("None"), float_option("None"))),
        softcap=draw(float_option()),
        dtype=repr(dtype),
        num_threads=draw(threads()),
    )
    case.call(f"cache = foveal.sparsek.SparseKCache({', '.join(sizes)}, {_kw(**options)})")
    call = ["state = lambda: (cache.length, cache.stored_rows, cache.threshold_entries)"]
    for step in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["append", "append", "attend", "attend", "misc"]))
        if op == "append":
            n = draw(st.integers(0, 3))
            k = case.array(f"k{step}", (d["B"], d["Hkv"], n, d["D"]))
            v = case.array(f"v{step}", (d["B"], d["Hkv"], n, d["Dv"]))
            u = case.array(f"u{step}", (d["B"], d["Hkv"], n))
            call.append(f"attempt(cache.append, {k}, {v}, {u}, state=state)")
        elif op == "attend":
            shape = (d["B"], d["Hkv"] * draw(st.integers(0, 3)), draw(st.integers(0, 2)), d["D"])
            q = case.array(f"q{step}", shape)
            return_lse = draw(flag())
            out = case.out_choice(f"out{step}", shape[:3] + (d["Dv"],), [q])
            call.append(
                f"r = attempt(cache.attend, {q}, return_lse={return_lse}, out={out}, state=state)"
            )
            call.append(
                "if r is not None:\n    "
                + _expect_attention(
                    "r", f"tuple({q}.shape[:3]) + (cache.dim_v,)", q, return_lse
                ).replace("\n", "\n    ")
            )
        else:
            a, b = draw(int_option(-1, 3)), draw(int_option(-1, 3))
            call.append(
                draw(
                    st.sampled_from(
                        [
                            f"attempt(cache.selected, {a}, {b})",
                            f"attempt(cache.threshold, {a}, {b})",
                            "cache.reset()",
                            "repr(cache)",
                        ]
                    )
                )
            )
    return case.done("\n".join(call) + "\n")


# --------------------------------------------------------------------------------------------
# Vector quantization.


@st.composite
def vq_functions_case(draw):
    function = draw(st.sampled_from(["assign", "assign", "perplexity", "effective_rank"]))
    case = Case(draw, f"vq.{function}")
    d = case.dims({"N": (0, 8), "K": (0, 6), "D": (0, 6)}, ("N", "K"))
    if function == "assign":
        case.array("x", (d["N"], d["D"]))
        case.array("c", (d["K"], d["D"]))
        metric = draw(st.sampled_from(["'l2'", "'cosine'", "'x'", "None"]))
        call = f"r = foveal.vq.assign(x, c, metric={metric}, num_threads={draw(threads())})\n"
        call += "expect(r.indices, x.shape[:1], x, 'int64')\n"
        call += "expect(r.sq_distances, x.shape[:1], x)\n"
    elif function == "perplexity":
        case.array("counts", (d["K"],), dtype=draw(st.sampled_from(["int64", "int64", "int32"])))
        call = "r = foveal.vq.perplexity(counts)\nassert isinstance(r, float)\n"
    else:
        case.array("m", (d["N"], d["D"]))
        call = "r = foveal.vq.effective_rank(m)\nassert isinstance(r, float)\n"
    return case.done(call)


@st.composite
def _vq_options(draw) -> str:
    if not _WILD[0]:
        return draw(st.sampled_from(["metric='l2'", "metric='cosine'", "decay=0.5"]))
    return _kw(
        metric=draw(st.sampled_from(["'l2'", "'cosine'", "'x'"])),
        decay=draw(st.sampled_from(["0.99", "0.5", "0.0", "1.0", "float('nan')", "'x'"])),
        epsilon=draw(st.sampled_from(["1e-5", "0.0", "-1.0", "float('inf')", "1e300"])),
        dead_threshold=draw(st.sampled_from(["1e-3", "0.0", "-1.0", "float('nan')", "2.0"])),
    )


def _lloyd(draw) -> str:
    if known("kmeans_no_convergence_exit"):
        return str(draw(st.integers(-1, 12)))
    return draw(int_option(-1, 12))


@st.composite
def vector_quantizer_case(draw):
    case = Case(draw, "VectorQuantizer")
    d = case.dims({"N": (0, 8), "K": (0, 5), "D": (0, 5)}, ("N",))
    options = draw(_vq_options())
    if draw(st.booleans()):
        case.array("c", (d["K"], d["D"]))
        case.call(f"vq = foveal.vq.VectorQuantizer(c, {options})")
    else:
        case.array("x0", (d["N"], d["D"]))
        case.call(
            f"vq = foveal.vq.VectorQuantizer.from_data(x0, {draw(int_option(-1, 6))}, "
            f"lloyd_iterations={_lloyd(draw)}, seed={draw(int_option())}, "
            f"num_threads={draw(threads())}, {options})"
        )
    call = ["state = lambda: (vq.codebook.tobytes(), vq.usage_counts().tobytes())"]
    for step in range(draw(st.integers(1, 5))):
        n = draw(st.integers(0, 6))
        x = case.array(f"x{step}", (n, d["D"]))
        op = draw(st.sampled_from(["quantize", "update", "init", "restart", "set", "diag"]))
        if op == "quantize":
            call.append(f"r = attempt(vq.quantize, {x}, num_threads={draw(threads())})")
            call.append(
                f"if r is not None: expect(r[0], {x}.shape[:1], {x}, 'int64'); "
                f"expect(r[1], ({x}.shape[0], vq.dim), {x}, 'float32')"
            )
        elif op == "update":
            call.append(
                f"attempt(vq.update, {x}, update_codebook={draw(flag())}, "
                f"num_threads={draw(threads())}, state=state)"
            )
        elif op == "init":
            call.append(
                f"attempt(vq.init_kmeans, {x}, lloyd_iterations={_lloyd(draw)}, "
                f"seed={draw(int_option())}, num_threads={draw(threads())}, state=state)"
            )
        elif op == "restart":
            call.append(
                f"attempt(vq.restart_dead_codes, {x}, seed={draw(int_option())}, state=state)"
            )
        elif op == "set":
            call.append(f"attempt(setattr, vq, 'codebook', {x}, state=state)")
        else:
            call.append(
                "vq.perplexity(); vq.num_dead_codes(); vq.codebook_effective_rank(); "
                "vq.cluster_size(); vq.reset_usage(); vq.metric; vq.decay"
            )
    return case.done("\n".join(call) + "\n")


@st.composite
def residual_vq_case(draw):
    case = Case(draw, "ResidualVQ")
    low = -1 if case.wild else 1
    sizes = [draw(int_option(low, 3)), draw(int_option(low, 4)), draw(int_option(low, 4))]
    case.call(f"rvq = foveal.vq.ResidualVQ({', '.join(sizes)}, {draw(_vq_options())})")
    call = []
    for step in range(draw(st.integers(1, 5))):
        n, dim = draw(st.integers(0, 6)), draw(st.sampled_from(["rvq.dim", "rvq.dim", "2"]))
        case.line(f"x{step} = None")
        call.append(f"x{step} = mk(({n}, {dim}), {case.dtype!r}, 'c', 'randn', {case.lib!r})")
        op = draw(st.sampled_from(["encode", "decode", "update", "init", "stage"]))
        if op == "encode":
            call.append(f"r = attempt(rvq.encode, x{step}, num_threads={draw(threads())})")
            call.append(f"if r is not None: expect(r[0], ({n}, rvq.num_stages), x{step}, 'int64')")
        elif op == "decode":
            codes = draw(st.sampled_from(["0", "1", "-1", "2**62", "9"]))
            call.append(f"codes = np.full(({n}, rvq.num_stages), {codes}, np.int64)")
            call.append("r = attempt(rvq.decode, codes)")
            call.append(f"if r is not None: expect(r, ({n}, rvq.dim), codes, 'float32')")
        elif op == "update":
            call.append(f"attempt(rvq.update, x{step}, num_threads={draw(threads())})")
        elif op == "init":
            call.append(
                f"attempt(rvq.init_kmeans, x{step}, lloyd_iterations={_lloyd(draw)}, "
                f"seed={draw(int_option())})"
            )
        else:
            call.append(f"s = attempt(rvq.stage, {draw(int_option(-1, 3))})")
            call.append("if s is not None: s.perplexity(); s.num_dead_codes(); s.codebook")
    return case.done("\n".join(call) + "\n")


# --------------------------------------------------------------------------------------------
# SPADE.


@st.composite
def _schema(draw, case: Case) -> None:
    features = []
    if not case.wild:
        for index in range(draw(st.integers(1, 4))):
            if index == 0 or draw(st.booleans()):
                features.append(
                    f"foveal.spade.Feature.binned('f{index}', {draw(st.integers(1, 4))})"
                )
            else:
                features.append(f"foveal.spade.Feature.continuous('f{index}')")
    for index in range(draw(st.integers(0, 4)) if case.wild else 0):
        shift = draw(st.sampled_from(["None", "None", "None", str(index + 1), "0", "-1", "2**40"]))
        if shift == "0" and known("spade_shift_zero"):
            shift = "None"
        kind = draw(st.integers(0, 4))
        if kind <= 1:
            features.append(
                f"foveal.spade.Feature.binned('f{index}', {draw(int_option(-1, 5))}, {shift})"
            )
        elif kind <= 3:
            features.append(f"foveal.spade.Feature.continuous('f{index}', {shift})")
        else:
            vocab, pad, missing = (draw(int_option(-1, 6)) for _ in range(3))
            name = draw(st.sampled_from([f"'f{index}'", "'f0'", "''"]))
            kind_name = draw(st.sampled_from(["'discrete'", "'continuous'", "'other'"]))
            features.append(
                f"foveal.spade.Feature({name}, {kind_name}, {vocab}, {pad}, {missing}, {shift})"
            )
    case.line(f"schema = foveal.spade.Schema([{', '.join(features)}])")
    case.line("fd, fc = len(schema.discrete), len(schema.continuous)")


@st.composite
def spade_functions_case(draw):
    function = draw(
        st.sampled_from(["delay", "undelay", "undelay_logits", "loss_mask", "next_step"])
    )
    case = Case(draw, f"spade.{function}")
    draw(_schema(case))
    b, n = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    lib = case.lib
    ids_value = draw(st.sampled_from(["1", "0", "-1", "99", "2**62"]))
    case.line(f"ids = mk(({b}, {n}, fd), 'int64', 'c', 'randn', {lib!r}, 1)")
    case.line(f"ids = ids * 0 + {ids_value} if {ids_value} != 1 else ids.clip(0, 2)")
    case.array("values", (b, n, draw(st.sampled_from(["fc", "fc", "1"]))), dtype="float32")
    pick = draw(
        st.sampled_from(["both", "both", "ids", "values", "none"] if case.wild else ["both"])
    )
    ids = "ids" if pick in ("both", "ids") else "None"
    values = "values" if pick in ("both", "values") else "None"
    threads_ = draw(threads())
    if function == "delay":
        lengths = draw(st.sampled_from(["None", f"[{n}] * {b}", "[1]", "[-1] * 3", "[2**62] * 3"]))
        call = (
            f"r = foveal.spade.delay(schema, {ids}, {values}, {lengths}, num_threads={threads_})\n"
        )
        call += f"expect(r[2], ({b}, schema.delayed_length({n}), len(schema.features)), ids if {ids} is not None else values, 'bool')\n"
    elif function == "undelay":
        call = f"r = foveal.spade.undelay(schema, {ids}, {values}, num_threads={threads_})\n"
        call += (
            f"n = {n} - schema.max_shift\nif r[0] is not None: expect(r[0], ({b}, n, fd), ids)\n"
        )
    elif function == "undelay_logits":
        case.array("logits", (b, n, draw(st.integers(0, 4)), draw(st.integers(0, 4))))
        out = case.out_choice("out", (b, max(n - 1, 0), 1, 1), ["logits"])
        call = (
            f"r = foveal.spade.undelay_logits(schema, logits, out={out}, num_threads={threads_})\n"
        )
        call += "assert tuple(r.shape)[:1] == tuple(logits.shape)[:1]\n"
    elif function == "loss_mask":
        lengths = draw(st.sampled_from(["[]", "[1, 2]", "[0]", "[-1]", "[2**62]", "np.array([3])"]))
        steps = draw(int_option(-1, 8))
        call = (
            f"r = foveal.spade.loss_mask(schema, {lengths}, {steps}, include_stop={draw(flag())})\n"
        )
        call += (
            f"expect(r, (len({lengths}), {steps} - 1, len(schema.features)), np.zeros(0), 'bool')\n"
        )
    else:
        case.line(f"mask = mk(({b}, {n}, 2), 'bool', 'c', 'randn', {lib!r}, 2)")
        call = f"r = foveal.spade.next_step({ids}, {values}, mask)\nassert len(r) == 5\n"
    return case.done(call, all_in_call=True)


@st.composite
def spade_embedding_case(draw):
    case = Case(draw, "SpadeEmbedding")
    draw(_schema(case))
    wild = case.wild
    e, hidden = draw(st.integers(0 if wild else 1, 4)), draw(st.integers(0 if wild else 1, 3))
    combine = draw(st.sampled_from(["'concat'", "'concat'", "'sum'", "'x'"][: 4 if wild else 1]))
    cond = draw(st.sampled_from(["0", "0", "2", "-1", "2**62"] if wild else ["0", "2"]))
    case.line(f"E, Hd, cond = {e}, {hidden}, {cond}")
    layout = draw(st.sampled_from(["c", "c", "f", "neg", "zero"] if wild else ["c", "f"]))
    fill = draw(st.sampled_from(["randn", "randn", "nan", "inf"] if wild else ["randn"]))
    wd = draw(st.sampled_from(["'float32'", "'float32'", "'float64'"] if wild else ["'float32'"]))
    case.line(
        "features = {}\n"
        "for i, f in enumerate(schema.features):\n"
        "    if f.discrete:\n"
        f"        w = {{'table': mk((max(f.vocab_size, 0) % 64, E), {wd}, {layout!r}, {fill!r}, seed=i)}}\n"
        f"        if i % 2: w.update(norm_weight=mk((E,), seed=i), norm_bias=mk((E,), seed=i))\n"
        "    else:\n"
        f"        w = {{'hidden_weight': mk((Hd, 1), {wd}, {layout!r}, {fill!r}, seed=i),\n"
        "             'hidden_bias': mk((Hd,), seed=i), 'output_weight': mk((E, Hd), seed=i),\n"
        "             'output_bias': mk((E,), seed=i)}\n"
        "    features[f.name] = w"
    )
    d_model = draw(st.integers(0 if wild else 1, 4))
    proj = draw(
        st.sampled_from(
            [
                "mk((DM, E * len(schema.features) + (cond if cond < 64 else 0)))",
                "None",
                "mk((DM, 3))",
            ][: 3 if wild else 1]
        )
    )
    case.line(f"DM = {d_model}")
    case.line(
        f"emb = foveal.spade.SpadeEmbedding(schema, features, projection_weight={proj}, "
        f"projection_bias={draw(st.sampled_from(['None', 'mk((DM,))', 'mk((7,))'][: 3 if wild else 2]))}, "
        f"combine={combine}, condition_dim=cond, norm_eps={draw(float_option('1e-5'))}, "
        f"pad_vector={draw(st.sampled_from(['None', 'mk((DM,))', 'mk((1,))'][: 3 if wild else 2]))})"
    )
    b, t = draw(st.integers(0, 2)), draw(st.integers(0, 4))
    ids_value = draw(st.sampled_from(["0", "1", "-1", "2**62", "99"][: 5 if wild else 2]))
    case.line(f"ids = np.full(({b}, {t}, fd), {ids_value}, np.int64)")
    columns = draw(st.sampled_from(["fc", "fc", "2"][: 3 if wild else 1]))
    case.array("values", (b, t, columns), dtype="float32")
    condition = draw(
        st.sampled_from(
            [
                "None",
                f"mk(({b}, {t}, max(cond, 0) % 64))",
                f"mk(({b}, max(cond, 0) % 64))",
                "mk((1,))",
            ]
        )
    )
    out = draw(st.sampled_from(["None", f"mk(({b}, {t}, emb.d_model))", "values"]))
    call = (
        f"r = emb(ids if fd else None, values if fc else None, condition={condition}, out={out}, "
        f"num_threads={draw(threads())})\nexpect(r, ({b}, {t}, emb.d_model), r)\nrepr(emb)\n"
    )
    return case.done(call, all_in_call=True)


@st.composite
def spade_decoder_case(draw):
    case = Case(draw, "spade.Decoder")
    draw(_schema(case))
    batch, max_tokens = draw(int_option(-1, 3)), draw(int_option(-1, 5))
    case.line(f"dec = foveal.spade.Decoder(schema, {batch}, {max_tokens})")
    call = ["dec.first_step()"]
    for _ in range(draw(st.integers(1, 8))):
        value = draw(st.sampled_from(["1", "0", "-1", "2**62", "f.missing_id"]))
        call.append(
            f"ids = np.array([[{value} if '{value}' != 'f.missing_id' else f.missing_id "
            "for f in schema.discrete]] * max(dec.batch, 0), np.int64).reshape(max(dec.batch, 0), fd)"
        )
        call.append(
            f"vals = mk((max(dec.batch, 0), fc), 'float32', 'c', {draw(st.sampled_from(FILLS))!r})"
        )
        call.append("r = attempt(dec.step, ids if fd else None, vals if fc else None)")
        call.append("if r is not None: expect(r[2], (dec.batch,), r[2], 'int64')")
    call.append("dec.current_step; dec.lengths; dec.finished; dec.done; dec.tokens()")
    return case.done("\n".join(call) + "\n")


# --------------------------------------------------------------------------------------------
# PDE-SSM.


@st.composite
def pde_ssm_case(draw):
    function = draw(st.sampled_from(["pde_ssm", "pde_ssm_backward", "PdeSsm", "torch.pde_ssm"]))
    case = Case(draw, f"pde_ssm.{function}" if "." not in function else function)
    if function == "torch.pde_ssm":
        case.lib = "torch"
    low = 0 if case.wild else 1
    d = case.dims({"B": (0, 2), "H": (low, 5), "W": (low, 5), "C": (low, 4)}, ("B",))
    groups = draw(st.sampled_from([1, 1, d["C"], 2, 0] if case.wild else [1, d["C"]]))
    dt = case.dtype if case.dtype in ("float32", "float64") else "float32"
    layout = draw(
        st.sampled_from(["'channels_last'", "'channels_first'", "'x'"][: 3 if case.wild else 2])
    )
    shape = (d["B"], d["H"], d["W"], d["C"])
    if layout == "'channels_first'":
        shape = (d["B"], d["C"], d["H"], d["W"])
    case.array("x", shape)
    values = {
        "diffusion": [f"mk(({groups}, 3), '{dt}')", "[0.1, 0.0, 0.1]", "0.5", "[[1.0, 2.0, 0.5]]"],
        "velocity": [f"mk(({groups}, 2), '{dt}')", "[0.0, 0.0]", "[1e300, -1e300]"],
        "reaction": [f"mk(({groups},), '{dt}')", "0.0", "-1.0", "1e3", "float('nan')"],
        "time": [f"np.abs(mk(({groups},), '{dt}'))", "1.0", "0.0", "-1.0", "1e300", "float('inf')"],
        "skip": ["None", f"mk(({groups},), '{dt}')", "1.0"],
    }
    values = {
        name: draw(st.sampled_from(choices if case.wild else choices[:2]))
        for name, choices in values.items()
    }
    for name, value in values.items():
        case.line(f"{name} = {value}")
    if case.lib == "torch":
        case.line(
            "import torch\n"
            "to_t = lambda p: torch.from_numpy(np.abs(p) if False else p) if isinstance(p, np.ndarray) else p\n"
            "diffusion, velocity, reaction, time, skip = map(to_t, (diffusion, velocity, reaction, time, skip))"
        )
    n = None if case.wild else 2
    options = _kw(
        mode=draw(st.sampled_from(["'initial_value'", "'forced'", "'x'", "1"][:n])),
        boundary=draw(st.sampled_from(["'periodic'", "'zero'", "'x'"][:n])),
        diffusion_form=draw(st.sampled_from(["'cholesky'", "'raw'", "'x'"][:n])),
        num_threads=draw(threads()),
    )
    params = "diffusion, velocity, reaction, time, skip"
    if function == "pde_ssm":
        out = case.out_choice("out", shape, ["x"])
        call = f"r = foveal.pde_ssm.pde_ssm(x, {params}, {options}, layout={layout}, out={out})\n"
        call += "expect(r, x.shape, x)\n"
    elif function == "pde_ssm_backward":
        case.array("g", shape)
        call = f"r = foveal.pde_ssm.pde_ssm_backward(x, g, {params}, {options}, layout={layout})\n"
        call += "expect(r.x, g.shape, g)\n"
    elif function == "PdeSsm":
        dims = [str(d[n]) for n in ("H", "W", "C")]
        if draw(st.integers(0, 3)) == 0:
            dims[draw(st.integers(0, 2))] = draw(int_option())
        call = f"block = foveal.pde_ssm.PdeSsm({', '.join(dims)}, {params}, {options})\n"
        call += "block.transform_shape; block.height; block.dtype\n"
        call += f"r = block(x, layout={layout})\nexpect(r, x.shape, x)\n"
        case.array("g", shape)
        call += (
            f"gr = block.backward(x, g, layout={layout}, input_grad={draw(flag())}, "
            f"parameter_grads={draw(flag())})\n"
        )
    else:
        call = (
            "import foveal.torch\n"
            "x = x.clone().requires_grad_(x.dtype.is_floating_point)\n"
            f"r = foveal.torch.pde_ssm(x, {params}, {options}, layout={layout})\n"
            "expect(r, x.shape, x)\n"
            "if r.requires_grad: r.sum().backward()\n"
        )
    return case.done(call, all_in_call=True)


@st.composite
def torch_sparsek_case(draw):
    case = Case(draw, "torch.sparsek")
    case.lib = "torch"
    shape = tuple(draw(st.integers(0, 5)) for _ in range(draw(st.integers(1, 3))))
    case.array("z", shape)
    k = draw(int_option(-1, 6))
    call = (
        "import foveal.torch\n"
        "z = z.clone().requires_grad_(z.dtype.is_floating_point)\n"
        f"r = foveal.torch.sparsek(z, {k})\nexpect(r, z.shape, z)\n"
        "if r.requires_grad: r.sum().backward()\n"
    )
    return case.done(call)


# Edits of a SnapKVSelection `sel`, most of them breaking it.
SNAPKV_EDITS = [
    "sel.batch += 1",
    "sel.heads_kv -= 1",
    "sel.len_k -= 1",
    "sel.kept += 1",
    "sel.kept = {huge}",
    "sel.keys = sel.keys[..., ::-1].copy()",
    "sel.keys = np.append(sel.keys, {huge})",
    "sel.keys.reshape(-1)[{index} % max(sel.keys.size, 1):][:1] = {huge}",
    "sel.keys = sel.keys.astype(np.float64) + 0.5",
    "sel.keys = None",
    "sel.batch = {wrong}",
]

# A SnapKVSelection `sel` for k: kept keys per (b, kv head), strictly increasing, in range.
# (An edited one may keep its keys in another shape: their count is what counts.)
_SNAPKV_KEYS_OK = (
    "assert sel.keys.size == k.shape[0] * k.shape[1] * sel.kept, (sel.keys.shape, sel.kept)\n"
    "assert 0 <= sel.kept <= k.shape[2], sel.kept\n"
    "keys = sel.keys.reshape(k.shape[0], k.shape[1], sel.kept)\n"
    "assert keys.size == 0 or ((np.diff(keys, axis=-1) > 0).all() and "
    "keys.min() >= 0 and keys.max() < k.shape[2]), 'malformed keys'\n"
)


@st.composite
def snapkv_case(draw):
    """snapkv_select (its keys follow the selection's rules), snapkv_compress (shapes: the kept
    rows of k and v), snapkv_gather over the selection, maybe edited (accepted: the kept rows)."""
    function = draw(st.sampled_from(["select", "compress", "gather"]))
    case = Case(draw, f"snapkv.{function}")
    case.maybe_half()
    dims = case.dims(SPARSE_DIMS, zero_for_huge=("B", "Lq", "Hkv"))
    _qkv(case, dims)
    options = dict(
        budget=draw(_fraction()),
        threshold=draw(st.sampled_from(["0.0", "0.0", "0.5", "0.9"]) | _fraction()),
        window=draw(st.sampled_from(["64", "1", "7"]) | int_option(-1, 70)),
        pool=draw(st.sampled_from(["7", "1", "3"]) | int_option(-1, 9)),
        local_tokens=draw(int_option(-1, 70)),
        causal=draw(st.sampled_from(["True", "True"]) | flag()),
        sink_tokens=draw(int_option(-1, 70)),
        scale=draw(st.one_of(st.just("None"), float_option("None"))),
        softcap=draw(float_option()),
        q_offset=draw(st.one_of(st.just("None"), int_option(-2, 12))),
    )
    threads_ = draw(threads())
    select = f"foveal.snapkv_select(q, k, {_kw(**options)}, num_threads={threads_})"
    if function == "select":
        call = f"sel = {select}\nassert sel.keys.shape == (k.shape[0], k.shape[1], sel.kept)\n"
        return case.done(f"{call}{_SNAPKV_KEYS_OK}repr(sel)\n")
    if function == "compress":
        call = (
            f"kk, vv = foveal.snapkv_compress(q, k, v, {_kw(**options)}, num_threads={threads_})\n"
            "assert tuple(kk.shape[:2]) == tuple(k.shape[:2]) and kk.shape[3] == k.shape[3]\n"
            "assert tuple(vv.shape) == (*v.shape[:2], kk.shape[2], v.shape[3]), vv.shape\n"
        )
        return case.done(call)
    call = f"sel = {select}\n"
    if draw(st.booleans()):
        call += draw(st.sampled_from(SNAPKV_EDITS)).format(
            huge=draw(st.sampled_from(["-1", "2**40", "-(2**63)"])),
            index=draw(st.integers(0, 9)),
            wrong=draw(st.sampled_from(WRONG_TYPES)),
        )
        call += "\n"
    call += (
        "kk, vv = foveal.snapkv_gather(sel, k, v)\n"
        f"{_SNAPKV_KEYS_OK}"
        "assert tuple(kk.shape) == (*k.shape[:2], sel.kept, k.shape[3]), kk.shape\n"
        "assert tuple(vv.shape) == (*v.shape[:2], sel.kept, v.shape[3]), vv.shape\n"
    )
    return case.done(call)


@st.composite
def num_threads_case(draw):
    case = Case(draw, "set_num_threads")
    value = draw(st.one_of(int_option(-2, 4), threads()))
    call = f"foveal.set_num_threads({value})\nassert foveal.get_num_threads() >= 1\n"
    call += "foveal.attention_kernel_names()\n"
    return case.done(call)


# name -> strategy, one test each.
ENTRY_POINTS = {
    "attention": attention_case(),
    "sliding_window_attention": attention_case("sliding_window_attention"),
    "attention_backward": attention_backward_case(),
    "merge_states": merge_states_case(),
    "block_sparse": block_sparse_case(),
    "token_topk": block_sparse_case("token_topk"),
    "vertical_slash": block_sparse_case("vertical_slash"),
    "snapkv": snapkv_case(),
    "kv_cache": kv_cache_case(),
    "quest_cache": kv_cache_case(quest=True),
    "paged_cache": paged_cache_case(),
    "make_attention": make_attention_case(),
    "sparsek_attention": sparsek_attention_case(),
    "sparsek_functions": sparsek_functions_case(),
    "sparsek_cache": sparsek_cache_case(),
    "vq_functions": vq_functions_case(),
    "vector_quantizer": vector_quantizer_case(),
    "residual_vq": residual_vq_case(),
    "spade_functions": spade_functions_case(),
    "spade_embedding": spade_embedding_case(),
    "spade_decoder": spade_decoder_case(),
    "pde_ssm": pde_ssm_case(),
    "torch_sparsek": torch_sparsek_case(),
    "num_threads": num_threads_case(),
}
