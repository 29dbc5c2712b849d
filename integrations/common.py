"""What both harness adapters need: model_args parsing and cutting generated text at stop strings."""
import torch

from visualrwkv.rwkv import pick_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(device=None, dtype=None):
    "(torch.device, torch.dtype): CUDA when present, its dtype from pick_dtype unless named ('float32', ...); checked."
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None or dtype == "auto": return device, pick_dtype(device)
    if isinstance(dtype, torch.dtype): return device, dtype
    if dtype not in DTYPES: raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return device, DTYPES[dtype]


def positive_int(name, value) -> int:
    "`value` (an int or its string, as --model_args gives it) as an int >= 1, else a ValueError naming `name`."
    try: n = int(value)
    except (TypeError, ValueError): raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1: raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def cut_at(text: str, until) -> str:
    "`text` up to the first of the `until` strings: cut_at('a.b\\nc', ['\\n', '.']) -> 'a'."
    return min((text.split(u)[0] for u in until), key=len, default=text)


def until_strings(gen_kwargs: dict) -> list:
    "The non-empty stop strings of a harness's gen_kwargs['until'] (a string or a list; absent: none)."
    until = gen_kwargs.get("until", [])
    return [u for u in ([until] if isinstance(until, str) else until) if u]
