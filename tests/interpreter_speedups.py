"""Three of Triton's CPU interpreter's costs that do not change what it computes, removed for the
test suite (``tests/conftest.py`` installs them when it sets ``TRITON_INTERPRET=1``).

* **Re-patching ``triton.language`` on every device-function call.**  A kernel launch patches
  ``triton.language`` (its builtins, ``tensor``'s methods, ``reduce``...) with interpreter
  versions for the launch, and restores them after its last program.  Triton 3.9's
  ``InterpretedFunction.__call__`` -- a ``@triton.jit`` helper called from a kernel -- patches
  them *again* on every call, in every program (``inspect.getmembers`` over the modules and a
  fresh lambda per builtin, ~1 ms), and never restores that patch.  Our kernels call small
  helpers (``_max_nan``, ``int8_gemm_tile``...) in their loops, so most of an attention or
  fused-region test was this.  Here a helper call inside a launch skips the patch when the
  modules it sees (``triton.language`` / ``triton.language.core`` among its globals, what the
  patch covers) are already patched by that launch; elsewhere (a helper called outside any
  launch, or one seeing a module the launch's kernel did not) it patches as before.
* **``_get_np_dtype``** builds its 17-entry table on every call (hundreds of thousands per
  test); here the table is built once.
* **Reductions with a combine function of their own** (``tl.reduce(x, axis, _max_nan)``:
  NaN-propagating maxima, in every range pass) ran the combine function once per *element*,
  a Python loop of interpreted ops (35 ms for a 16 x 32 block).  Here it runs once per
  *slice* along the reduced axis, on whole slices: the same left fold, in the same order,
  for every output element (:func:`_fold_reduce`).

Measured on a 2-core Zen 3 VM (2026-12-03, one process, ``SQCOMPILE_PLAIN_INTERPRETER=1`` for
the plain interpreter): ``test_backend_reads_qkv_heads_in_place_and_writes_their_gradient_in_
place[split]`` 57 s -> 24 s, ``test_outer_gradient_scale_runs_fused`` 90 s -> 61 s; the whole
suite (``python -m pytest``, empty Inductor and Triton caches) 38:32 -> 27:35.  The folded
reductions (same VM, one core, A/B in two processes): ``test_backend_compiles_a_symbolic_
sequence_length_with_the_fused_attention[split]`` 55.7 s -> 44.6 s.

They replace private Triton functions, so :func:`install` checks that they are the ones this
was written against (by their source) and leaves the interpreter alone otherwise: the tests
then run as before, only slower.  ``SQCOMPILE_PLAIN_INTERPRETER=1`` skips it.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os

# sha256 of the sources this was written against (Triton 3.9)
_EXPECTED = {
    "InterpretedFunction.__call__": "f2446df46264004916b677478c2eef6ef349bd2c04a99da9eade596b78cd54d8",
    "GridExecutor.__call__": "e52d3746b0f33a88dd4e678c0dc5a9fb518efc986cebccc61e16185fd8860d46",
    "_get_np_dtype": "8f20d41e3207891ae9872819aff05bee11d5c9bbe24f772282cb3ac72749fc75",
    "ReduceOps.generic_reduce": "982b63f20d16162f726180f8f2cfbf7df75f08cdfb85b752408b250ca2f6b2d2",
}


def _digest(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def install() -> bool:
    """Apply the changes if Triton's interpreter is the expected one; True when applied."""
    if os.environ.get("SQCOMPILE_PLAIN_INTERPRETER") == "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter as I
        found = {"InterpretedFunction.__call__": I.InterpretedFunction.__call__,
                 "GridExecutor.__call__": I.GridExecutor.__call__, "_get_np_dtype": I._get_np_dtype,
                 "ReduceOps.generic_reduce": I.ReduceOps.generic_reduce}
        if any(_digest(fn) != _EXPECTED[name] for name, fn in found.items()):
            return False
    except Exception:           # no Triton, or not the interpreter we know
        return False

    languages = (tl, tl.core)
    launch, original_np_dtype = I.GridExecutor.__call__, I._get_np_dtype
    patched: list = []          # per launch in progress: the modules its patch covers

    @functools.cache
    def modules_of(fn) -> frozenset:
        """The language modules among ``fn``'s globals (what ``_patch_lang`` patches for it)."""
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in languages)

    @functools.wraps(launch)
    def launch_call(self, *args, **kwargs):
        patched.append(set(modules_of(self.fn)))
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    def device_call(self, *args, **kwargs):
        modules = modules_of(self.fn)
        if not patched or not modules <= patched[-1]:
            I._patch_lang(self.fn)
            if patched:
                patched[-1] |= modules
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise I.InterpreterError(repr(e)) from e

    cached_np_dtype = functools.cache(original_np_dtype)

    def np_dtype(tt_dtype):
        if isinstance(tt_dtype, tl.block_type):
            tt_dtype = tt_dtype.element_ty
        if isinstance(tt_dtype, tl.pointer_type):      # unhashable; the original's uint64
            return original_np_dtype(tt_dtype)
        return cached_np_dtype(tt_dtype)

    I.GridExecutor.__call__ = launch_call
    I.InterpretedFunction.__call__ = device_call
    I._get_np_dtype = np_dtype
    I.ReduceOps.generic_reduce = _fold_reduce
    return True


def _fold_reduce(self, input):
    """``ReduceOps.generic_reduce`` (``self``: the reduction; ``input``: its operands, a tuple
    of interpreter tensors) folding whole slices: for ``k`` = 1 .. n-1 along the reduced axis,
    ``acc = combine_fn(acc, slice_k)`` with ``acc`` starting at slice 0 -- per output element
    the fold the original runs element by element, in the same order, each partial result
    stored in the operand's dtype as the original stores it."""
    import numpy as np
    import triton.language as tl

    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    data = [arg.handle.data for arg in input]
    out_shape = data[0].shape[:axis] + data[0].shape[axis + 1:]

    def values(r):              # a combined result as an array of the output's shape
        if isinstance(r, tl.core.tensor):
            return r.handle.data.reshape(out_shape)
        return np.full(out_shape, getattr(r, "value", r))

    acc = [np.take(d, 0, axis=axis).astype(d.dtype) for d in data]
    for k in range(1, data[0].shape[axis]):
        ret = self.combine_fn.fn(*(self.to_tensor(a, arg.dtype) for a, arg in zip(acc, input)),
                                 *(self.to_tensor(np.take(d, k, axis=axis), arg.dtype) for d, arg in zip(data, input)))
        acc = [values(r).astype(a.dtype) for r, a in zip(ret if isinstance(ret, tuple) else (ret,), acc)]
    out = []
    for a, arg in zip(acc, input):
        if self.keep_dims:
            a = np.expand_dims(a, axis) if original_axis is not None else a.reshape((1,) * data[0].ndim)
        elif original_axis is None:
            a = a.item()
        out.append(self.to_tensor(a, arg.dtype))
    return out
