"""Software prefetch of one row of a 2-D C-contiguous array, for the block passes' gathers.

The sparse block pass reads a row of W (and then adds into a row of P) for every stored entry of
a block, at row indices that jump at random. Those rows come from the last-level cache or from
memory, and the core's out-of-order window alone keeps too few of them in flight: the pass waited
on them (docs/architecture.md, "Prefetching W's and P's rows"). ``prefetch_read(a, i)`` and
``prefetch_write(a, i)`` ask the CPU to start loading every cache line of row ``i`` of ``a`` now,
a few entries before the pass needs it (LLVM's ``llvm.prefetch``: ``prefetcht0`` on x86-64,
``prfm`` on AArch64, nothing where the target has no prefetch). A prefetch never faults and
changes no value: results are bitwise those of the pass without it.

Under ``NUMBA_DISABLE_JIT=1`` both are plain no-ops, so the kernels still run as Python.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["AHEAD", "prefetch_read", "prefetch_write"]

#: How many stored entries ahead the block passes prefetch rows (docs/architecture.md,
#: "Prefetching W's and P's rows": 8 and 16 measured alike, both far better than none).
AHEAD = np.uintp(8)

#: Bytes of a cache line: one prefetch per line of the row (and one at its last byte, for a row
#: that does not start on a line boundary).
LINE_BYTES = 64


def _prefetch_row(rw: int):
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch_row(typingctx, arr, i):
        if not (isinstance(arr, types.Array) and arr.ndim == 2 and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            row = context.cast(builder, args[1], sig.args[1], types.intp)
            stride = cgutils.unpack_tuple(builder, ary.strides)[0]
            start = builder.add(builder.ptrtoint(ary.data, cgutils.intp_t), builder.mul(row, stride))
            vp = cgutils.voidptr_t
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [vp, i32, i32, i32])
            fn = builder.module.declare_intrinsic("llvm.prefetch", [vp], fnty)
            # (address, rw: 0 read / 1 write, locality 3: keep in all levels, 1: data cache)
            flags = [ir.Constant(i32, rw), ir.Constant(i32, 3), ir.Constant(i32, 1)]
            zero = ir.Constant(cgutils.intp_t, 0)
            line = ir.Constant(cgutils.intp_t, LINE_BYTES)
            with cgutils.for_range_slice(builder, zero, stride, line) as (offset, _):
                builder.call(fn, [builder.inttoptr(builder.add(start, offset), vp)] + flags)
            last = builder.sub(builder.add(start, stride), ir.Constant(cgutils.intp_t, 1))
            builder.call(fn, [builder.inttoptr(last, vp)] + flags)
            return context.get_dummy_value()

        return types.void(arr, i), codegen

    return prefetch_row


if numba.config.DISABLE_JIT:
    def prefetch_read(a, i):
        """No-op without JIT (module docstring)."""

    def prefetch_write(a, i):
        """No-op without JIT (module docstring)."""
else:
    prefetch_read = _prefetch_row(0)
    prefetch_write = _prefetch_row(1)
