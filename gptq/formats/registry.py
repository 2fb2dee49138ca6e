"""``--format`` → the Format that writes it."""

from __future__ import annotations

from gptq.core.config import ConfigError, QuantConfig
from gptq.formats.base import Format
from gptq.formats.bnb import Bnb4bit
from gptq.formats.compressed_tensors import CompressedTensors
from gptq.formats.gguf import GGUF
from gptq.formats.gguf.rules import FILE_TYPES
from gptq.formats.gptq import GPTQ

GGUF_TYPES = tuple(FILE_TYPES)
# name → how to build it from a config (and the part after "gguf:")
FORMATS = {
    "gptq": lambda c, _: GPTQ(c, "gptq"),
    "gptq_v2": lambda c, _: GPTQ(c, "gptq_v2"),
    "bnb-nf4": lambda c, _: Bnb4bit(c, "nf4"),
    "bnb-fp4": lambda c, _: Bnb4bit(c, "fp4"),
    "bnb-nf4+dq": lambda c, _: Bnb4bit(c, "nf4", double_quant=True),
    "bnb-fp4+dq": lambda c, _: Bnb4bit(c, "fp4", double_quant=True),
    "compressed-tensors": lambda c, _: CompressedTensors(c),
    "gguf": lambda c, t: GGUF(c, t),
}
NAMES = [n for n in FORMATS if n != "gguf"] + [f"gguf:{t}" for t in GGUF_TYPES]


def get(config: QuantConfig) -> Format:
    """The format ``config.format`` names, its settings checked against the config (ConfigError)."""
    name, _, option = config.format.partition(":")
    if name not in FORMATS or (name == "gguf" and not option and not config.mixed) or (name != "gguf" and option):
        raise ConfigError(f"--format {config.format!r}; choose one of {', '.join(NAMES)}"
                          + (" (plain gguf, the types chosen per tensor, takes a size budget: --max-size or "
                             "--bits-per-weight)" if name == "gguf" else ""))
    fmt = FORMATS[name](config, option)
    fmt.check()
    return fmt
