"""Which rows of a parameter take part in a step: the rule of ``lazy="rows"``.

In a group with ``lazy="rows"``, each row (slice along dim 0) of a parameter of two or more
dimensions is a parameter of its own for the rule: it is active when its grad has a nonzero
element. ``active_rows`` decides that for a dense grad in one read; ``touched_rows`` for a
sparse COO grad, at the cost of the rows it names. The step machinery that applies the decision
is ``safeopt._rows``.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["ROWS", "active_rows", "touched_rows"]

ROWS = "rows"  # the value of a group's "lazy" key that selects row-level skipping

# A floating element is nonzero exactly when a bit other than its sign bit is set. On a
# little-endian machine the sign bit is the top bit of an element's last byte.
_SIGN_BYTE = 0x80
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_MAGNITUDE = {2: 0x7FFF, 4: 0x7FFF_FFFF, 8: 0x7FFF_FFFF_FFFF_FFFF}


def _by_rows(grad: Tensor) -> Tensor:
    """``grad`` as a real ``[rows, elements]`` tensor with unit stride along a row (a copy only
    when the grad's rows are not laid out that way)."""
    if grad.is_complex():  # a conjugate view differs from its values only in signs: undone, no copy
        grad = torch.view_as_real(grad.conj() if grad.is_conj() else grad)
    flat = grad.reshape(grad.shape[0], -1)
    return flat if flat.stride(1) == 1 else flat.contiguous()


def _nonzero_rows(rows: Tensor) -> Tensor:
    """Which rows of a real ``[n, k]`` tensor have an element with a bit other than the sign bit set."""
    size = rows.element_size()
    if size not in _INT_OF_SIZE:
        return rows.ne(0).any(1)
    return rows.view(_INT_OF_SIZE[size]).bitwise_and(_MAGNITUDE[size]).ne(0).any(1)


# Rows at least this long (in bytes) are first judged by their first element alone: reading one
# element a row touches at most 1/16 of the grad's cache lines.
_WIDE_ROW_BYTES = 1024


def active_rows(grad: Tensor) -> Tensor:
    """Ascending int64 indices of the rows of ``grad`` (slices along dim 0) with a nonzero element.

    An element is nonzero when a bit other than its sign bit is set: ``-0.0`` is zero; NaN, inf
    and subnormals are not (whatever ``torch.set_flush_denormal`` says). The grad is read once:
    the largest *byte* of each row (``amax`` over a ``uint8`` view, one pass at memory speed, no
    temporary the size of the grad). A row whose largest byte is 0 is all ``+0.0``; one whose
    largest byte is neither 0 nor 0x80 has a nonzero element. Only rows whose largest byte is
    0x80 (``-0.0``, or rarer mantissa bytes) are looked at again, element by element.

    Rows of 1 KB or more are first judged by their first element: a nonzero one settles the row
    without reading the rest, so a grad whose rows are all active costs a read of one element a
    row. The rows it leaves open are read in full as above.
    """
    if not grad.numel():
        return torch.zeros(0, dtype=torch.long, device=grad.device)
    flat = _by_rows(grad)
    if flat.shape[1] * flat.element_size() >= _WIDE_ROW_BYTES:
        # Wide rows (grouped experts, large embedding widths): a row whose first element is
        # nonzero is active without reading the rest. Rows left open are read in full, gathered
        # when they are few, else by the whole-grad pass below.
        known = _nonzero_rows(flat[:, :1])
        open_rows = flat.shape[0] - int(known.sum())
        if not open_rows:
            return torch.arange(flat.shape[0], device=grad.device)
        if open_rows <= _IN_PLACE_ROWS and flat.device.type == "cpu" and sys.byteorder == "little":
            unknown = (~known).nonzero().squeeze(1)
            known[unknown[_open_rows_in_place(flat, unknown)]] = True
            return known.nonzero().squeeze(1)
        if 2 * open_rows <= flat.shape[0]:
            unknown = (~known).nonzero().squeeze(1)
            known[unknown[_rows_of(flat.index_select(0, unknown))]] = True
            return known.nonzero().squeeze(1)
    return _rows_of(flat)


# Up to this many wide rows left open by their first element (idle experts, say) are read where
# they lie, one ``amax`` each: gathering them first copies them (measured: 4 ms a step for 16
# idle experts of 512 KB and 256 KB, on a fused AdamW step of 15 ms), and the whole-grad pass
# reads the rows their first element settled too (a third of a step with 48 of 64 idle). On the
# CPU only: on an accelerator a kernel launch per row is not measured to pay (none was available).
_IN_PLACE_ROWS = 256


def _open_rows_in_place(flat: Tensor, unknown: Tensor) -> Tensor:
    """``_rows_of`` for the rows ``unknown`` of ``flat`` (little-endian), as a bool mask over
    ``unknown``, reading each row in place: nothing is copied."""
    as_bytes = flat.view(torch.uint8)
    ids = unknown.tolist()
    top = torch.stack([as_bytes[i].amax() for i in ids])
    active = top.ne(0)
    unsure = (top == _SIGN_BYTE).nonzero().squeeze(1).tolist()
    for j in unsure:
        active[j] = _nonzero_rows(flat[ids[j] : ids[j] + 1])[0]
    return active


def _rows_of(flat: Tensor) -> Tensor:
    """``active_rows`` of a real ``[rows, elements]`` tensor with unit stride along a row."""
    if sys.byteorder != "little":
        return _nonzero_rows(flat).nonzero().squeeze(1)
    top = flat.view(torch.uint8).amax(1)
    candidates = top.nonzero().squeeze(1)
    unsure = top.index_select(0, candidates) == _SIGN_BYTE
    if not bool(unsure.any()):
        return candidates
    keep = ~unsure
    keep[unsure] = _nonzero_rows(flat.index_select(0, candidates[unsure]))
    return candidates[keep]


def touched_rows(grad: Tensor) -> tuple[Tensor, Tensor | None]:
    """The active rows of a grad of two or more dimensions, and for a sparse COO grad those rows
    of ``grad.coalesce().to_dense()`` (None for a dense grad, whose rows are read in place).

    A sparse grad is densified on the rows it names only: ``coalesce()`` sums duplicate indices
    (in the order the densified oracle sums them, which for a row repeated many times is not the
    grad's own order); the densified grad holds ``0 + v`` for each real coalesced value ``v``, so
    ``-0.0`` becomes ``+0.0`` there, and so it does here (complex values go through ``to_dense()``
    itself, on these rows only). ``active_rows`` of those rows then
    decides: a named row whose entries sum to zero is idle. Cost: the rows named, never the table.
    """
    if grad.layout is not torch.sparse_coo:
        return active_rows(grad), None
    sparse = grad.coalesce()
    indices, values = sparse.indices(), sparse.values()
    if sparse.sparse_dim() != 1:  # every dimension sparse (values are elements), or none
        if not sparse.sparse_dim():
            dense = sparse.to_dense()
            rows = active_rows(dense)
            return rows, dense.index_select(0, rows)
        named, inverse = torch.unique_consecutive(indices[0], return_inverse=True)
        local = torch.cat([inverse.unsqueeze(0), indices[1:]])
        shape = (named.numel(), *grad.shape[1:])
        dense = torch.sparse_coo_tensor(
            local, values, shape, is_coalesced=True, check_invariants=False
        ).to_dense()
        keep = active_rows(dense)
        if keep.numel() != named.numel():
            named, dense = named.index_select(0, keep), dense.index_select(0, keep)
        return named, dense
    named = indices[0]
    keep = active_rows(values)  # -0.0 is zero to the check, NaN and inf are not, as densified
    if keep.numel() != named.numel():
        named, values = named.index_select(0, keep), values.index_select(0, keep)
    if values.is_complex():
        # to_dense() multiplies by a complex 1 (a NaN part makes both parts NaN): let it do so
        local = torch.arange(named.numel(), device=grad.device).unsqueeze(0)
        values = torch.sparse_coo_tensor(
            local, values, values.shape, is_coalesced=True, check_invariants=False
        ).to_dense()
        return named, values
    return named, values.add(0).contiguous()  # what to_dense() makes of a real value: 0 + v
