"""Typed, named tensors: what a model declares it takes, and how one request's tensors are
checked and a batch of them is assembled (padded where a dimension is variable).

A model declares its inputs (``TensorSpec``: name, dtype, shape). A dimension given as a
name (``"seq"``) is variable: it may differ from request to request, the inputs that share
the name must agree within one request, and ``max_dims`` may bound it. A batch pads every
variable dimension to the longest in the batch with each input's ``pad`` value (0 for a mask
means "not a real position"), so a request's result does not depend on its neighbours.

A request's tensors are numpy arrays with no batch dimension; bfloat16 (which numpy lacks)
travels as float32 holding bfloat16 values, and is cast back when the batch is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

Dim = int | str
"""A dimension: a fixed size, or the name of a variable dimension."""

DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("float32"), torch.float32),
    "float16": (np.dtype("float16"), torch.float16),
    "bfloat16": (np.dtype("float32"), torch.bfloat16),
    "int64": (np.dtype("int64"), torch.int64),
    "int32": (np.dtype("int32"), torch.int32),
    "uint8": (np.dtype("uint8"), torch.uint8),
    "bool": (np.dtype("bool"), torch.bool),
}
"""Declared dtype -> (how a request's array holds it, the tensor the model gets)."""

SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "U8": "uint8",
    "BOOL": "bool",
}
"""safetensors dtype codes of the declared dtypes."""
TORCH_NAMES = {torch_dtype: name for name, (_, torch_dtype) in DTYPES.items()}

DEFAULT_INPUT = "input"
"""The name of the single input of a model that declares only ``input_shape``."""


@dataclass(frozen=True)
class TensorSpec:
    """One declared input: its name, dtype, shape (without the batch dimension), the value
    that pads its variable dimensions, the values it may hold, and whether it is a mask."""

    name: str
    dtype: str = "float32"
    shape: tuple[Dim, ...] = ()
    pad: float = 0
    value_range: tuple[float, float] | None = None
    """The smallest and largest value allowed (e.g. token ids: 0 to vocabulary size - 1)."""
    mask: bool = False
    """A mask: only 0 and 1, and at least one 1 (a request with no real position would get
    a result that depends on its batch's padding)."""

    @property
    def variable(self) -> bool:
        """True when a dimension of this input varies from request to request."""
        return any(isinstance(d, str) for d in self.shape)

    @cached_property
    def storage(self) -> np.dtype:
        """The numpy dtype a request's array of this input has."""
        return DTYPES[self.dtype][0]

    def describe(self) -> str:
        """``input_ids int64 [seq]``: for error messages."""
        return f"{self.name} {self.dtype} [{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class ModelSpec:
    """What the decoder and the batcher need to know about a served model."""

    model_id: str
    model_type: str
    input_shape: tuple[int, ...] = ()
    """The single float32 input's shape, for a model that declares no ``inputs``."""
    inputs: tuple[TensorSpec, ...] = ()
    max_dims: tuple[tuple[str, int], ...] = ()
    """Upper bounds of variable dimensions, as (name, size) pairs."""
    text: bool = False
    """True when the model has a tokenizer (it takes ``encoding=text``)."""
    max_tokens: int = 0
    """The tokenizer's ``max_length``: a text is never longer, in tokens, once tokenised."""
    bucketing: bool = True
    """Batch requests of similar length together (models with variable dimensions)."""

    def __post_init__(self) -> None:
        if not self.inputs:
            only = TensorSpec(DEFAULT_INPUT, "float32", tuple(self.input_shape))
            object.__setattr__(self, "inputs", (only,))

    @cached_property
    def input_size(self) -> int:
        """Number of values in one input (the single fixed-shape input; else 0)."""
        return math.prod(self.input_shape) if self.input_shape else 0

    @property
    def named(self) -> bool:
        """True for a model that declares its inputs (not one float32 ``input_shape``)."""
        return not self.input_shape

    @cached_property
    def single_float32(self) -> bool:
        """True when the model takes one fixed-shape float32 input (``encoding=f32``)."""
        only = self.inputs[0]
        return len(self.inputs) == 1 and only.dtype == "float32" and not only.variable

    @cached_property
    def input_names(self) -> frozenset[str]:
        """The declared inputs' names."""
        return frozenset(spec.name for spec in self.inputs)

    @property
    def variable(self) -> bool:
        """True when some input dimension is variable."""
        return any(spec.variable for spec in self.inputs)

    def max_dim(self, name: str) -> int | None:
        """The declared bound of a variable dimension (None: bounded by the input size)."""
        return dict(self.max_dims).get(name)

    def max_values(self) -> int | None:
        """The most values one request's inputs can hold (None when unbounded)."""
        total = 0
        for spec in self.inputs:
            sizes = [d if isinstance(d, int) else self.max_dim(d) for d in spec.shape]
            if any(size is None for size in sizes):
                return None
            total += math.prod(s for s in sizes if s is not None)
        return total


class TensorMismatch(ValueError):
    """A request's tensors do not fit the model's declared inputs (the message says how)."""


def check_tensors(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Check a request's tensors (already of the declared dtypes) against ``spec``; return
    the sizes of the variable dimensions. Raises ``TensorMismatch`` naming the tensor."""
    declared = {s.name for s in spec.inputs}
    extra = sorted(set(tensors) - declared)
    if extra:
        raise TensorMismatch(
            f"tensor {extra[0][:64]!r} is not an input of {spec.model_id}: expected "
            + ", ".join(s.describe() for s in spec.inputs)
        )
    sizes: dict[str, int] = {}
    for input_spec in spec.inputs:
        array = tensors.get(input_spec.name)
        if array is None:
            raise TensorMismatch(
                f"missing tensor {input_spec.name}: {spec.model_id} expects "
                + ", ".join(s.describe() for s in spec.inputs)
            )
        _check_shape(spec, input_spec, array.shape, sizes)
        _check_values(input_spec, array)
    return sizes


def _check_values(input_spec: TensorSpec, array: np.ndarray) -> None:
    """Refuse values outside the input's declared range, and a mask that is not 0/1 or has
    no real position."""
    if input_spec.mask:
        if not np.isin(array, (0, 1)).all():
            raise TensorMismatch(f"tensor {input_spec.name} is a mask: expected only 0 and 1")
        if not array.any():
            raise TensorMismatch(
                f"tensor {input_spec.name} is all 0: expected at least one real position (1)"
            )
    if input_spec.value_range is not None and array.size:
        low, high = input_spec.value_range
        if array.min() < low or array.max() > high:
            raise TensorMismatch(
                f"tensor {input_spec.name} holds values outside {low:g} to {high:g} "
                f"(got {array.min():g} to {array.max():g})"
            )


def _check_shape(
    spec: ModelSpec, input_spec: TensorSpec, shape: tuple[int, ...], sizes: dict[str, int]
) -> None:
    wrong = f"tensor {input_spec.name} has shape {list(shape)}; expected {input_spec.describe()}"
    if len(shape) != len(input_spec.shape):
        raise TensorMismatch(wrong)
    for size, dim in zip(shape, input_spec.shape, strict=True):
        if isinstance(dim, int):
            if size != dim:
                raise TensorMismatch(wrong)
            continue
        bound = spec.max_dim(dim)
        if size < 1 or (bound is not None and size > bound):
            limit = f"1 to {bound}" if bound is not None else "at least 1"
            raise TensorMismatch(f"{wrong}: dimension {dim} must be {limit}, got {size}")
        if sizes.setdefault(dim, size) != size:
            raise TensorMismatch(
                f"{wrong}: dimension {dim} is {sizes[dim]} in another tensor of this request"
            )


@dataclass
class Batch:
    """One batch as the model gets it: a tensor per declared input (padded), and each
    request's size of each variable dimension."""

    tensors: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)
    """Variable dimension name -> int64 tensor (batch,) of each request's real size."""
    real_elements: int = 0
    padded_elements: int = 0
    """Values added by padding (beyond the requests' own)."""

    @property
    def size(self) -> int:
        """How many requests the batch holds."""
        return len(next(iter(self.tensors.values())))


def collate(spec: ModelSpec, requests: Sequence[Mapping[str, np.ndarray]]) -> Batch:
    """Stack the requests' tensors into one batch, padding variable dimensions to the
    longest in the batch with each input's pad value."""
    batch = Batch({})
    for input_spec in spec.inputs:
        arrays = [request[input_spec.name] for request in requests]
        stacked = _pad_stack(input_spec, arrays) if input_spec.variable else np.stack(arrays)
        real = sum(a.size for a in arrays)
        batch.real_elements += real
        batch.padded_elements += stacked.size - real
        tensor = torch.from_numpy(stacked)
        wanted = DTYPES[input_spec.dtype][1]
        batch.tensors[input_spec.name] = tensor if tensor.dtype == wanted else tensor.to(wanted)
    for input_spec in spec.inputs:
        for axis, dim in enumerate(input_spec.shape):
            if isinstance(dim, str) and dim not in batch.lengths:
                sizes = [request[input_spec.name].shape[axis] for request in requests]
                batch.lengths[dim] = torch.tensor(sizes, dtype=torch.int64)
    return batch


def _pad_stack(input_spec: TensorSpec, arrays: list[np.ndarray]) -> np.ndarray:
    longest = tuple(max(sizes) for sizes in zip(*(a.shape for a in arrays), strict=True))
    out = np.full((len(arrays), *longest), input_spec.pad, dtype=input_spec.storage)
    for row, array in zip(out, arrays, strict=True):
        row[tuple(slice(0, n) for n in array.shape)] = array
    return out


def bucket_of(length: int) -> int:
    """The length bucket a request of ``length`` is batched in: the next power of two
    (at least 8), so a batch pads each request to at most about twice its length."""
    return max(8, 1 << max(0, length - 1).bit_length())


@dataclass
class ModelOutputs:
    """A batch's named outputs, for a model type to turn into per-request results."""

    tensors: dict[str, torch.Tensor]
    batch: Batch
    shapes: dict[str, tuple[Dim, ...]] = field(default_factory=dict)
    """Declared output shapes: a dimension named like a variable input dimension is cut to
    each request's size by ``rows``."""

    def get(self, name: str | None = None) -> torch.Tensor:
        """The output called ``name`` (None: the first); KeyError names the outputs."""
        if name is None:
            return next(iter(self.tensors.values()))
        if name not in self.tensors:
            raise KeyError(f"the model has no output {name!r}; it has {sorted(self.tensors)}")
        return self.tensors[name]

    def rows(self, name: str | None = None) -> list[np.ndarray]:
        """Each request's part of an output, as a contiguous numpy array (bfloat16 as
        float32), cut to the request's own size along declared variable dimensions."""
        key = name or next(iter(self.tensors))
        tensor = self.get(key).detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        array = tensor.numpy()
        cuts = [
            (axis, self.batch.lengths[dim].tolist())
            for axis, dim in enumerate(self.shapes.get(key, ()))
            if isinstance(dim, str) and dim in self.batch.lengths
        ]
        rows = []
        for i in range(array.shape[0]):
            index: list[slice] = [slice(None)] * (array.ndim - 1)
            for axis, sizes in cuts:
                index[axis] = slice(0, sizes[i])
            rows.append(np.ascontiguousarray(array[i][tuple(index)]))
        return rows

    def mask(self, input_name: str = "attention_mask") -> torch.Tensor:
        """(batch, seq) 1 for a real position, 0 for padding: the declared mask input, else
        built from the requests' sizes of the (single) variable dimension."""
        given = self.batch.tensors.get(input_name)
        if given is not None:
            return given
        if len(self.batch.lengths) != 1:
            raise KeyError(
                f"no {input_name} input, and {len(self.batch.lengths)} variable dimensions"
            )
        lengths = next(iter(self.batch.lengths.values()))
        longest = int(lengths.max())
        return (torch.arange(longest)[None, :] < lengths[:, None]).to(torch.int64)
