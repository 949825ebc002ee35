"""A nested training state as flat, named tensors plus a JSON skeleton: what a sharded checkpoint stores.

DCP writes tensors well and everything else as pickles. Keeping the non-tensor part (counters, optimiser
hyper-parameters, Python's random state, the config) as JSON in a uint8 tensor means a checkpoint holds tensors
only: nothing in it is unpickled on load except DCP's own metadata, which a restricted unpickler reads
(`dcp_io.py`). The skeleton keeps what JSON alone would lose (integer dict keys of optimiser states, tuples), so
`unflatten(*flatten(state))` gives back an equal state, floats bit for bit (JSON writes them with `repr`).
"""

from __future__ import annotations

import json
from typing import Any

import torch

TENSOR, ITEMS, TUPLE = "$tensor", "$items", "$tuple"


def flatten(state: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(skeleton, tensors): every tensor of `state` under a key `prefix/<path>`, and `state` with each tensor
    replaced by a reference to its key.

    Raises:
        TypeError: a value that is neither a tensor, a container nor a JSON scalar (it names its path).
        ValueError: two tensors that would be stored under the same key.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"{prefix}/{path}"
            if key in tensors:
                raise ValueError(f"two tensors of the state map to the checkpoint key '{key}'")
            tensors[key] = value
            return {TENSOR: key}
        if isinstance(value, dict):
            items = [(k, encode(v, f"{path}/{k}" if path else str(k))) for k, v in value.items()]
            if all(isinstance(k, str) and not k.startswith("$") for k, _ in items):
                return dict(items)
            if not all(isinstance(k, (str, int)) for k, _ in items):
                raise TypeError(f"'{path}': dict keys must be str or int to be stored in a checkpoint")
            return {ITEMS: [[k, v] for k, v in items]}
        if isinstance(value, tuple):
            return {TUPLE: [encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"'{path}': a {type(value).__name__} cannot be stored in a checkpoint")

    return encode(state, ""), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state `flatten` took apart; a tensor missing from `tensors` is a KeyError naming its key."""
    if isinstance(skeleton, dict):
        if TENSOR in skeleton:
            return tensors[skeleton[TENSOR]]
        if ITEMS in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton[ITEMS]}
        if TUPLE in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton[TUPLE])
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def json_tensor(value: Any) -> torch.Tensor:
    """`value` as JSON text in a uint8 tensor."""
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def from_json_tensor(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.numpy()).decode())
