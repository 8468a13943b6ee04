"""Loading PyTorch-named safetensors weights into NNX models, lazily and checked.

A ``TensorSource`` reads tensors by name on demand: from one ``.safetensors`` file, from a
folder holding one (or a sharded set with a ``*.safetensors.index.json``), or from an in-memory
dict. Files are memory-mapped and a tensor is copied out only when it is asked for, so loading
a model shard by shard never holds more than the target parameters plus one tensor in host
memory. The reader is our own (the format is an 8-byte header length, a JSON header and raw
little-endian data), so no PyTorch is needed and bfloat16 tensors load as ``ml_dtypes``.

``load_state`` maps every NNX parameter path (``"blocks.0.attn.q.kernel"``) to a PyTorch key
through an explicit table, converts layouts by what the NNX leaf is (``kernel`` of a linear:
(out, in) -> (in, out); of a 2D conv: OIHW -> HWIO; of a 1D conv: OIK -> KIO; anything else:
as stored) and checks every tensor against the model's abstract shapes. Any missing,
unexpected or mis-shaped key fails with one ``WeightsMismatch`` listing them all, before the
model is touched: nothing is half-loaded.
"""

import json
import mmap
import os
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class WeightsError(ValueError):
    """A weights file or folder that cannot be read (missing, malformed, wrong format)."""


class WeightsMismatch(ValueError):
    """Weights that do not fit the target model: missing, unexpected or mis-shaped keys."""


class _SafetensorsFile:
    """One memory-mapped safetensors file: its header and zero-copy views of its tensors."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            n = int.from_bytes(self._map[:8], "little")
            header = json.loads(self._map[8 : 8 + n])
        except (OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{path}: not a readable safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._offset = 8 + n
        self.entries = header
        for name, entry in header.items():
            problem = _entry_problem(entry, len(self._map) - self._offset)
            if problem:
                raise WeightsError(f"{path}: tensor {name!r} is corrupt ({problem})")

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = entry["dtype"]
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        begin, end = entry["data_offsets"]
        buffer = self._map[self._offset + begin : self._offset + end]
        return np.frombuffer(buffer, SAFETENSORS_DTYPES[dtype]).reshape(entry["shape"])


def _entry_problem(entry, data_bytes: int) -> str | None:
    """What is wrong with one header entry (``dtype``, ``shape``, ``data_offsets``) of a file
    with ``data_bytes`` bytes after its header, or None: checked when the file is opened, so a
    truncated or hand-edited file fails there, naming the tensor, not deep inside a load."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return "header entry lacks dtype, shape or data_offsets"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return f"data_offsets {offsets!r} is not [begin, end]"
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        return f"data_offsets [{begin}, {end}] outside the file's {data_bytes} data bytes (truncated?)"
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is not None and end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        return f"{end - begin} bytes for shape {shape} of {entry['dtype']}"
    return None


class TensorSource(Mapping):
    """Read-only mapping ``name -> np.ndarray`` whose tensors are read on access."""

    def __init__(
        self,
        readers: Mapping[str, Callable[[], np.ndarray]],
        shapes: Mapping[str, tuple],
        where: str,
        metadata: Mapping[str, str] | None = None,
    ):
        self._readers = dict(readers)
        self._shapes = dict(shapes)
        self.where = where
        self.metadata = dict(metadata or {})  # the files' ``__metadata__`` (string -> string)

    @classmethod
    def from_dict(cls, tensors: Mapping[str, np.ndarray], where: str = "<dict>") -> "TensorSource":
        arrays = {k: np.asarray(v) for k, v in tensors.items()}
        return cls({k: (lambda a=a: a) for k, a in arrays.items()}, {k: a.shape for k, a in arrays.items()}, where)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._readers[name]()

    def __iter__(self):
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def shape(self, name: str) -> tuple:
        return tuple(self._shapes[name])

    def with_prefix_removed(self, prefix: str) -> "TensorSource":
        """The tensors whose names start with ``prefix``, renamed without it (LoRA files, single files)."""
        kept = [k for k in self._readers if k.startswith(prefix)]
        return TensorSource(
            {k[len(prefix) :]: self._readers[k] for k in kept},
            {k[len(prefix) :]: self._shapes[k] for k in kept},
            self.where,
            self.metadata,
        )


def _files_of(path: str) -> list[str]:
    """The safetensors files of ``path``: the file itself, the shards of an index, or the folder's one file."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such safetensors file or folder")
    indices = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    if len(indices) > 1:
        raise WeightsError(f"{path}: several safetensors index files ({', '.join(indices)})")
    if indices:
        index_path = os.path.join(path, indices[0])
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise WeightsError(f"{index_path}: not a safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise WeightsError(f"{index_path}: shard files missing: {', '.join(missing)}")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(files) != 1:
        found = ", ".join(files) if files else "none"
        raise WeightsError(f"{path}: expected one .safetensors file or an index, found {found}")
    return [os.path.join(path, files[0])]


def open_safetensors(path: str) -> TensorSource:
    """Lazy tensors of a safetensors file, a folder with one, or a folder with a sharded index."""
    readers, shapes, metadata = {}, {}, {}
    for file in map(_SafetensorsFile, _files_of(path)):
        metadata.update(file.metadata)
        for name, entry in file.entries.items():
            if name in readers:
                raise WeightsError(f"{path}: tensor {name!r} appears in more than one shard")
            readers[name] = lambda file=file, name=name: file.read(name)
            shapes[name] = tuple(entry["shape"])
    return TensorSource(readers, shapes, path, metadata)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write ``tensors`` as one safetensors file (atomic: written to a temporary name, then renamed).

    Each tensor is read twice, for the header and when written, and never held with the others: a
    lazy ``TensorSource`` (e.g. the entries of a table being rewritten) is copied one tensor at a time."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name in sorted(tensors):
        array = np.require(tensors[name], requirements="C")  # keeps 0-d arrays 0-d
        if array.dtype not in names:
            raise WeightsError(f"{path}: cannot write tensor {name!r} of dtype {array.dtype}")
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per writer: two processes writing one path never share it
    with open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in sorted(tensors):
            f.write(np.require(tensors[name], requirements="C").tobytes())
    os.replace(tmp, path)


# PyTorch -> NNX axis order of a ``kernel`` by rank: linear (out, in) -> (in, out), 1D conv
# (O, I, K) -> (K, I, O), 2D conv (O, I, H, W) -> (H, W, I, O).
_KERNEL_TO_NNX = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0)}


def _kernel_axes(array: np.ndarray, param_path: str) -> tuple[int, ...] | None:
    """The torch -> NNX permutation of the leaf at ``param_path``, or None when stored as is."""
    return _KERNEL_TO_NNX.get(array.ndim) if param_path.rsplit(".", 1)[-1] == "kernel" else None


def to_nnx_layout(array: np.ndarray, param_path: str) -> np.ndarray:
    """A PyTorch tensor in the layout of the NNX leaf at ``param_path`` (see the module docstring)."""
    axes = _kernel_axes(array, param_path)
    return array if axes is None else array.transpose(axes)


def from_nnx_layout(array: np.ndarray, param_path: str) -> np.ndarray:
    """Inverse of ``to_nnx_layout``: an NNX leaf in PyTorch's layout (for exports)."""
    axes = _kernel_axes(array, param_path)
    return array if axes is None else array.transpose(np.argsort(axes))


def param_path(path: Iterable) -> str:
    """The dotted name of an NNX state path, e.g. ``("blocks", 0, "q", "kernel")`` -> ``"blocks.0.q.kernel"``."""
    return ".".join(str(p) for p in path)


def param_shapes(abstract_state: nnx.State) -> dict[str, tuple]:
    """``{dotted path: shape}`` of every leaf of an (abstract) NNX state."""
    return {param_path(p): tuple(leaf.shape) for p, leaf in nnx.to_flat_state(abstract_state)}


def check_names(
    targets: Mapping[str, tuple],
    tensors: TensorSource,
    names: Mapping[str, str],
    ignore: Iterable[str] = (),
) -> None:
    """Raise ``WeightsMismatch`` unless ``names`` maps every target to a stored tensor of its shape.

    ``targets`` is ``{dotted NNX path: shape}``, ``names`` ``{dotted NNX path: stored name}``;
    stored tensors no target uses are unexpected unless they match a regex of ``ignore``.
    """
    ignore = [re.compile(p) for p in ignore]
    missing = sorted(p for p in targets if p not in names or names[p] not in tensors)
    used = {names[p] for p in targets if p in names}
    unexpected = sorted(k for k in tensors if k not in used and not any(r.fullmatch(k) for r in ignore))
    misshaped = []
    for p, shape in targets.items():
        if p in names and names[p] in tensors:
            stored = tensors.shape(names[p])
            converted = to_nnx_layout(np.empty(stored, np.bool_), p).shape
            if converted != tuple(shape):
                misshaped.append(f"{names[p]} {list(stored)} -> {p} expects {list(shape)}")
    problems = []
    for label, items in (("missing", [names.get(p, p) for p in missing]), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise WeightsMismatch(f"{tensors.where}: weights do not fit the model; " + "; ".join(problems))


def load_state(
    abstract_state: nnx.State,
    tensors: TensorSource,
    names: Mapping[str, str],
    *,
    ignore: Iterable[str] = (),
    shardings=None,
) -> nnx.State:
    """A concrete NNX state with every leaf read from ``tensors[names[path]]``, checked first.

    Each tensor is converted to the leaf's layout and dtype and placed on device (with the
    matching leaf of ``shardings``, an ``nnx.State`` of shardings, when given) one at a time.
    """
    flat = nnx.to_flat_state(abstract_state)
    check_names(param_shapes(abstract_state), tensors, names, ignore)
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    leaves = []
    for path, leaf in flat:
        dotted = param_path(path)
        array = to_nnx_layout(tensors[names[dotted]], dotted).astype(leaf.dtype)
        sharding = flat_shardings.get(path)
        value = jax.device_put(array, sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding)
        leaves.append((path, leaf.replace(value) if hasattr(leaf, "replace") else value))
    return nnx.from_flat_state(leaves)


def load_module(
    make: Callable[[], nnx.Module],
    tensors: TensorSource,
    names: Mapping[str, str],
    *,
    ignore: Iterable[str] = (),
) -> nnx.Module:
    """Build ``make()``'s module from ``tensors`` without initialising it first (``nnx.eval_shape``)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, load_state(abstract, tensors, names, ignore=ignore))
