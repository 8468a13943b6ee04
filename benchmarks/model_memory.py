"""Parameters and memory of SD3.5-Medium and Z-Image for DanceOPD's student + 2 teachers (``docs/MODELS.md``).

    python benchmarks/model_memory.py                                # prints the document
    python benchmarks/model_memory.py --rank 128 --out docs/MODELS.md

Computed, not measured: every count sums the leaf shapes of ``nnx.eval_shape`` of this
project's NNX modules built from the released configs (``mmdit.MMDIT_PRESETS``,
``zimage.ZIMAGE_PRESETS``; the text encoders' and the VAE's configs below), so no weights are read
and nothing is allocated. The two SD3 transformers take about 40 s each to trace on a 2-core CPU.

Memory of the setting "student + 2 teachers" (a design goal: experts that fine-tune one base should
be storable as LoRA deltas over one shared base copy), in bytes, with P transformer parameters,
T the positional table, L the LoRA parameters at rank r and s bytes per stored element::

    A  three full copies, student fully fine-tuned:  3 (P + T) s + P s + 8 P (+ 4 P if s = 2)
    B  three full copies, student trains LoRA:       3 (P + T) s + 16 L
    C  one shared base, student and teachers LoRA:   (P + T) s + 16 L + 2 L s

(float32 AdamW moments 8 bytes per trainable parameter; a bfloat16 full student keeps float32
master weights; LoRA factors train in float32: weight, gradient and two moments, 16 bytes).
"""

import collections
import dataclasses
import datetime
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping

import flax
import jax
import numpy as np
from flax import nnx

from danceopd_jax.commands import ArgumentParser, folder_problem
from danceopd_jax.models.clip import CLIPTextConfig, CLIPTextModelWithProjection
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.lora import LoRAParam, add_lora
from danceopd_jax.config_lib import ZIMAGE_LORA_TARGETS
from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig, Buffer, mmdit_config
from danceopd_jax.models.qwen3 import Qwen3Config, Qwen3DecoderLayer, Qwen3TextEncoder
from danceopd_jax.models.t5 import T5Config, T5EncoderModel
from danceopd_jax.models.vae import SD3_VAE, AutoencoderKL
from danceopd_jax.models.zimage import ZImageConfig, ZImageTransformer, zimage_config

# The paper's student LoRA (docs/METHOD.md, "Paper setup"): attention q, k, v, out and the MLP, on both
# streams of the joint attention and on the MMDiT-X self-attention ``attn2`` (NNX attribute names;
# diffusers calls to_out ``to_out.0``, fc1 ``net.0.proj`` and fc2 ``net.2``).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "fc1", "fc2")

# The transformers tabulated; the first is the one the "student + 2 teachers" settings are for.
TRANSFORMERS = {"SD3.5-Medium": "sd35_medium", "SD3-Medium": "sd3_medium"}

# SD3's frozen text encoders (the ``config.json`` of ``text_encoder``, ``text_encoder_2`` and
# ``text_encoder_3`` in stabilityai/stable-diffusion-3.5-medium) and VAE.
CLIP_L = CLIPTextConfig(  # openai/clip-vit-large-patch14
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, hidden_act="quick_gelu", eos_token_id=2,
)  # fmt: skip
CLIP_G = CLIPTextConfig(  # laion/CLIP-ViT-bigG-14 (OpenCLIP), text tower
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, hidden_act="gelu", eos_token_id=2,
)  # fmt: skip
T5_XXL = T5Config(  # google/t5-v1_1-xxl, encoder
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
)
FROZEN_MODELS = {
    "CLIP-L/14 text encoder + projection": lambda: CLIPTextModelWithProjection(CLIP_L, rngs=InitKeys(0)),
    "OpenCLIP bigG/14 text encoder + projection": lambda: CLIPTextModelWithProjection(CLIP_G, rngs=InitKeys(0)),
    "T5-v1.1-XXL encoder": lambda: T5EncoderModel(T5_XXL, rngs=InitKeys(0)),
    "VAE (AutoencoderKL, encoder + decoder)": lambda: AutoencoderKL(SD3_VAE, rngs=InitKeys(0)),
}

# Z-Image's text encoder: Qwen3-4B (``text_encoder/config.json`` of Tongyi-MAI/Z-Image; tied embeddings).
QWEN3_4B = Qwen3Config(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
)  # fmt: skip


def qwen3_params(config: Qwen3Config) -> int:
    """``Qwen3Model``'s parameters: our encoder (embeddings and the first n - 1 layers, what
    ``hidden_states[-2]`` reads) plus the last layer and the final norm it does not build."""
    return (count_params(lambda: Qwen3TextEncoder(config, rngs=InitKeys(0)))
            + count_params(lambda: Qwen3DecoderLayer(config, rngs=InitKeys(0))) + config.hidden_size)  # fmt: skip


ZIMAGE_FROZEN = {
    "Qwen3-4B text encoder (all 36 layers; 35 are run)": lambda: qwen3_params(QWEN3_4B),
    "VAE (Flux-format AutoencoderKL, encoder + decoder)": lambda: count_params(lambda: AutoencoderKL(SD3_VAE, rngs=InitKeys(0))),
}

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
H100_BYTES = 81559 * 2**20  # an "80 GB" H100 as NVML / nvidia-smi reports it (81,559 MiB = 79.65 GiB)
JAX_PREALLOCATED = 0.75  # XLA_CLIENT_MEM_FRACTION's default (JAX docs, "GPU memory allocation")


@dataclasses.dataclass(frozen=True)
class TransformerSizes:
    """Element counts of an ``MMDiT`` and of its LoRA at one rank."""

    params: int  # nnx.Param (what diffusers' ``parameters()`` counts)
    buffer: int  # the positional table ``pos_embed.pos_embed`` (``mmdit.Buffer``, never trained)
    lora: int  # LoRA factors A and B on ``LORA_TARGETS``
    adapted: tuple[str, ...]  # dotted paths of the adapted layers


def leaf_count(state: nnx.State) -> int:
    """Number of elements in all leaves of ``state``."""
    return sum(int(np.prod(leaf.shape)) for _, leaf in nnx.to_flat_state(state))


def count_params(make: Callable[[], nnx.Module]) -> int:
    """Elements of the ``nnx.Param`` variables of ``make()``, built abstractly.

    Raises ``ValueError`` (NNX's non-exhaustive filter) if the module holds anything else.
    """
    _, params = nnx.split(nnx.eval_shape(make), nnx.Param)
    return leaf_count(params)


def transformer_sizes(config: MMDiTConfig, rank: int) -> TransformerSizes:
    """Counts of ``MMDiT(config)`` and of its LoRA of ``rank`` on ``LORA_TARGETS``, from one abstract build."""
    adapted = []

    def build() -> MMDiT:
        model = MMDiT(config, rngs=InitKeys(0))
        adapted.extend(add_lora(model, rank=rank, alpha=rank, targets=LORA_TARGETS, rngs=InitKeys(1)))
        return model

    _, lora, buffer, params = nnx.split(nnx.eval_shape(build), LoRAParam, Buffer, nnx.Param)
    return TransformerSizes(leaf_count(params), leaf_count(buffer), leaf_count(lora), tuple(adapted))


def zimage_sizes(config: ZImageConfig, rank: int) -> TransformerSizes:
    """Counts of ``ZImageTransformer(config)`` and of its LoRA of ``rank`` on ``ZIMAGE_LORA_TARGETS``
    (RoPE is computed, so nothing is a buffer)."""
    adapted = []

    def build() -> ZImageTransformer:
        model = ZImageTransformer(config, rngs=InitKeys(0))
        adapted.extend(add_lora(model, rank=rank, alpha=rank, targets=ZIMAGE_LORA_TARGETS.split(","), rngs=InitKeys(1)))
        return model

    _, lora, params = nnx.split(nnx.eval_shape(build), LoRAParam, nnx.Param)
    return TransformerSizes(leaf_count(params), 0, leaf_count(lora), tuple(adapted))


def lora_count_formula(config: MMDiTConfig, rank: int) -> int:
    """``L = r d (36 (n - 1) + 24 + 8 |D|)``: LoRA on ``LORA_TARGETS`` of an MMDiT in closed form.

    Each adapted layer [in, out] gets ``r (in + out)`` parameters; with width d, MLP 4d and every
    attention projection d -> d: an ordinary block has 8 projections (2 r d each) and 2 MLPs
    (fc1 + fc2: 10 r d), 36 r d; the last, ``context_pre_only`` block has 7 projections (no
    ``to_add_out``) and 1 MLP, 24 r d; each of the |D| dual-attention blocks adds ``attn2``'s
    4 projections, 8 r d.
    """
    n, dual = config.num_layers, len(config.dual_attention_layers)
    return rank * config.inner_dim * (36 * (n - 1) + 24 + 8 * dual)


def training_memory(sizes: TransformerSizes, s: int) -> dict[str, list[tuple[str, str, int]]]:
    """Bytes of "student + 2 teachers" per setting: ``{setting: [(item, formula, bytes)]}``.

    ``s`` is the bytes per element of stored weights (base, full copies, teacher deltas, a
    full student's working copy and gradients). Trainable parameters keep float32 AdamW
    moments; a full student stored in bfloat16 keeps float32 master weights; the student's LoRA
    factors are float32 (weight, gradient, m, v: 16 bytes each).
    """
    p, t, lora = sizes.params, sizes.buffer, sizes.lora
    return {
        "A. three full copies, student fully fine-tuned": [
            ("weights: student + 2 teachers", "3 (P + T) s", 3 * (p + t) * s),
            ("student gradients", "P s", p * s),
            ("student float32 master weights (bfloat16 storage only)", "4 P if s = 2", 4 * p if s < 4 else 0),
            ("student AdamW moments m, v (float32)", "8 P", 8 * p),
        ],
        "B. three full copies, student trains LoRA (the authors' release)": [
            ("weights: student's frozen base + 2 teachers", "3 (P + T) s", 3 * (p + t) * s),
            ("student LoRA (float32): weights, gradients, AdamW m, v", "16 L", 16 * lora),
        ],
        "C. one shared base, student and both teachers LoRA": [
            ("shared frozen base", "(P + T) s", (p + t) * s),
            ("student LoRA (float32): weights, gradients, AdamW m, v", "16 L", 16 * lora),
            ("2 teacher LoRA deltas", "2 L s", 2 * lora * s),
        ],
    }


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.2f}"


def _adapted_summary(adapted: tuple[str, ...]) -> str:
    """``attn.to_q`` x24, ...: each adapted layer name within a block (``transformer_blocks.N.``,
    ``layers.N.``, ...) and the number of blocks having it."""
    names = collections.Counter(re.sub(r"^[a-z_]+\.\d+\.", "", p) for p in adapted)
    return ", ".join(f"`{name}` x{count}" for name, count in names.items())


def _components_table(transformers: Mapping[str, tuple[MMDiTConfig, TransformerSizes]], frozen: Mapping[str, int], rank: int) -> list[str]:
    rows = ["| model | component | parameters | float32 GiB | bfloat16 GiB |", "|---|---|---:|---:|---:|"]

    def row(model: str, component: str, count: int):
        f32, bf16 = (_gib(count * DTYPE_BYTES[d]) for d in ("float32", "bfloat16"))
        rows.append(f"| {model} | {component} | {count:,} | {f32} | {bf16} |")

    for label, (_, sizes) in transformers.items():
        row(label, "transformer (`nnx.Param`): P", sizes.params)
        row(label, "positional table (`mmdit.Buffer`, not trained): T", sizes.buffer)
        row(label, f"LoRA r = {rank} on {len(sizes.adapted)} layers: L", sizes.lora)
    for label, count in frozen.items():
        row("SD3 / SD3.5 (frozen)", label, count)
    row("SD3 / SD3.5 (frozen)", "text encoders + VAE", sum(frozen.values()))
    return rows


def _settings_table(sizes: TransformerSizes) -> tuple[list[str], dict[str, dict[str, int]]]:
    """The settings' rows and ``{setting: {dtype: total bytes}}``."""
    by_dtype = {d: training_memory(sizes, s) for d, s in DTYPE_BYTES.items()}
    rows = ["| setting | item | bytes | s = 4 (float32) GiB | s = 2 (bfloat16) GiB |", "|---|---|---|---:|---:|"]
    totals = {}
    for setting, items in by_dtype["float32"].items():
        for i, (item, formula, _) in enumerate(items):
            f32, bf16 = by_dtype["float32"][setting][i][2], by_dtype["bfloat16"][setting][i][2]
            rows.append(f"| {setting if i == 0 else ''} | {item} | {formula} | {_gib(f32)} | {_gib(bf16)} |")
        totals[setting] = {d: sum(b for _, _, b in by_dtype[d][setting]) for d in DTYPE_BYTES}
        rows.append(f"| | **total** | | **{_gib(totals[setting]['float32'])}** | **{_gib(totals[setting]['bfloat16'])}** |")
    return rows, totals


def _h100_section(totals: Mapping[str, Mapping[str, int]]) -> list[str]:
    """What is left on one H100 per setting, of the whole device and of JAX's default share, and a verdict."""
    budget, share = H100_BYTES, int(JAX_PREALLOCATED * H100_BYTES)
    rows = [
        f"| setting | left of {_gib(budget)} GiB, s = 4 / s = 2 | left of JAX's {_gib(share)} GiB, s = 4 / s = 2 |",
        "|---|---:|---:|",
    ]
    for setting, t in totals.items():
        whole = " / ".join(_gib(budget - t[d]) for d in DTYPE_BYTES)
        default = " / ".join(_gib(share - t[d]) for d in DTYPE_BYTES)
        rows.append(f"| {setting} | {whole} | {default} |")
    cases = [(t[d], f"{setting.split('.')[0]} with s = {s}") for setting, t in totals.items() for d, s in DTYPE_BYTES.items()]
    above_share = [label for total, label in cases if total > share]
    if above_share:
        above_device = [label for total, label in cases if total > budget]
        verdict = (
            f"Weights and training state alone exceed JAX's default share for {', '.join(above_share)} (raise "
            f"`XLA_CLIENT_MEM_FRACTION`) and the whole device for {', '.join(above_device) or 'none'}."
        )
    else:
        total, label = max(cases)
        verdict = (
            f"The weights and training state of every setting fit on one H100, even in JAX's default share; the "
            f"largest, {label}, leaves {_gib(share - total)} GiB of that share for everything this page excludes."
        )
    intro = (
        f"One 80 GB H100: {budget / 2**20:,.0f} MiB = {_gib(budget)} GiB as nvidia-smi reports it, of which JAX "
        f"preallocates {JAX_PREALLOCATED:.0%} ({_gib(share)} GiB) unless `XLA_CLIENT_MEM_FRACTION` (formerly `XLA_PYTHON_CLIENT_MEM_FRACTION`) is raised. "
        "What each setting leaves for activations, rollout states and workspace:"
    )
    return [intro, "", *rows, "", verdict]


def render(
    transformers: Mapping[str, tuple[MMDiTConfig, TransformerSizes]],
    frozen: Mapping[str, int],
    rank: int,
    command: str,
    date: str,
) -> str:
    """``docs/MODELS.md``: component counts, the LoRA formula, the "student + 2 teachers" settings.

    ``transformers``: ``{label: (config, transformer_sizes(config, rank))}``, the first being the
    student's and teachers' model; ``frozen``: ``{label: parameters}`` of the text encoders and VAE.
    """
    main_label, (main_config, main_sizes) = next(iter(transformers.items()))
    settings, totals = _settings_table(main_sizes)
    d, n, dual = main_config.inner_dim, main_config.num_layers, len(main_config.dual_attention_layers)
    unused_add_q = rank * 2 * d
    lines = [
        "# Models: parameters and memory",
        "",
        "Generated by `benchmarks/model_memory.py`; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Date: {date}; jax {jax.__version__}, flax {flax.__version__}",
        "- **Computed, not measured**: each count sums the leaf shapes of `nnx.eval_shape` of this project's NNX",
        "  modules built from the released configs (`mmdit.MMDIT_PRESETS`; the text encoders' and VAE's configs in",
        "  the script); no weights are read, nothing is allocated. Bytes = count x bytes per element;",
        "  GiB = 2^30 bytes.",
        "",
        "## Components",
        "",
        *_components_table(transformers, frozen, rank),
        "",
        "P counts what diffusers' `parameters()` counts (`tests/test_model_memory.py` checks P, T and L against",
        "diffusers and PEFT on a tiny config). T is `pos_embed.pos_embed`, the fixed 2D sin-cos table of",
        "`pos_embed_max_size`^2 x d entries that diffusers stores as a persistent buffer: it is loaded with the",
        "weights but never trained.",
        "",
        "### LoRA",
        "",
        f"`add_lora(model, rank=r, alpha=r, targets={list(LORA_TARGETS)})`: the paper's student LoRA",
        "(rank 128, alpha 128, attention q, k, v, out and the MLP) on both streams of the joint attention and on",
        "the MMDiT-X self-attention `attn2`. A target matches an `nnx.Linear` whose path ends with it (PEFT's rule);",
        "diffusers calls `to_out` `to_out.0`, `fc1` `net.0.proj` and `fc2` `net.2`. Nothing outside the blocks is",
        f"adapted. {main_label}: {len(main_sizes.adapted)} layers: {_adapted_summary(main_sizes.adapted)}.",
        "",
        "A layer W [in, out] gets A [in, r] and B [r, out], r (in + out) parameters. With width d, MLP 4d, n blocks",
        "of which the set D has the dual attention, and the last block `context_pre_only` (no `to_add_out`, no",
        "`ff_context`):",
        "",
        "    L = r d (36 (n - 1) + 24 + 8 |D|)",
        "",
        "(an ordinary block: 8 attention projections of 2 r d and two MLPs of 10 r d; the last block: 7",
        f"projections and one MLP; `attn2`: 4 projections). {main_label}: r = {rank}, d = {d}, n = {n}, |D| = {dual}:",
        f"L = {lora_count_formula(main_config, rank):,}; counted: {main_sizes.lora:,}. The last block holds `attn.add_q_proj`",
        f"(diffusers computes and drops its text queries), so its adapter ({unused_add_q:,} parameters, counted above) exists,",
        "as with PEFT, but gets no gradient.",
        "",
        f"## Student + 2 teachers ({main_label}, r = {rank})",
        "",
        "s is the bytes per stored element of the frozen weights, the full copies, the teachers' deltas and a full",
        "student's working copy and gradients: 4 (float32) or 2 (bfloat16). A run in bfloat16 compute stores its frozen",
        "weights near s = 2 (`build.frozen_in_compute_dtype`): the bf16 layers in bfloat16; the adaLN, timestep and pooled-text",
        "layers and the norm scales, which work in float32, in float32. Trainable parameters keep float32 AdamW moments (`optax.adamw`: m and",
        "v, 8 bytes); a full student stored in bfloat16 also keeps float32 master weights (4 bytes); the student's",
        "LoRA factors train in float32 (weight, gradient, m, v: 16 bytes). Setting B is the authors' release",
        "(docs/METHOD.md: teachers as full frozen copies); C needs teachers that are LoRA fine-tunes of the same base",
        "(`lora.load_lora_deltas`). A full copy holds its own positional table.",
        "",
        *settings,
        "",
        "### On one H100",
        "",
        *_h100_section(totals),
        "",
        "## Text encoders and VAE",
        "",
        "They are frozen and needed only to precompute prompt embeddings (`sd3_prompts`) and to decode latents, so",
        "they need not stay on the device during training. Kept resident next to a setting above, they add",
        f"{_gib(4 * sum(frozen.values()))} GiB in float32, {_gib(2 * sum(frozen.values()))} GiB in bfloat16.",
        "",
        "## Not included",
        "",
        "- activations of the forward and backward passes (their size depends on the microbatch, resolution and `remat`);",
        "- rollout states and teacher outputs, prompt embeddings, batches;",
        "- XLA's workspace and fragmentation, the CUDA context;",
        "- an EMA of the student (`optimizer.ema_decay > 0`): 4 bytes more per trainable parameter; a gradient",
        "  accumulator (`grad_accum_steps` > 1): 4 bytes more per trainable parameter; the optimizer's step count;",
        "- sharding: figures are totals over devices; FSDP over k devices divides weights and optimizer state by",
        "  about k.",
        "",
    ]
    return "\n".join(lines)


def render_zimage(config: ZImageConfig, sizes: TransformerSizes, frozen: Mapping[str, int], rank: int) -> str:
    """The Z-Image section of ``docs/MODELS.md``: components, the student LoRA, "student + 2 teachers"."""
    rows = ["| component | parameters | float32 GiB | bfloat16 GiB |", "|---|---:|---:|---:|"]
    for label, count in {"transformer (`nnx.Param`): P": sizes.params, f"LoRA r = {rank} on {len(sizes.adapted)} layers: L": sizes.lora,
                         **{f"{label} (frozen)": count for label, count in frozen.items()}}.items():  # fmt: skip
        rows.append(f"| {label} | {count:,} | {_gib(4 * count)} | {_gib(2 * count)} |")
    settings, totals = _settings_table(sizes)
    lines = [
        "## Z-Image",
        "",
        f"`zimage.ZIMAGE_PRESETS['z_image']`: dim {config.dim}, {config.n_layers} layers and {config.n_refiner_layers} noise-",
        f"and {config.n_refiner_layers} context-refiner layers, {config.n_heads} heads, caption width {config.cap_feat_dim}",
        "(diffusers' `ZImageTransformer2DModel` defaults; `tests/test_zimage.py` checks P against diffusers' own count).",
        "RoPE is computed, so there is no positional table (T = 0 below).",
        "",
        *rows,
        "",
        f"The student's LoRA (`ZIMAGE_LORA_TARGETS`, the authors' targets): {_adapted_summary(sizes.adapted)}.",
        "",
        f"### Student + 2 teachers (Z-Image, r = {rank})",
        "",
        "The same settings and byte counts as for SD3.5-Medium above. Setting B is the authors' release (each",
        "teacher a full frozen copy); C is this project's: teachers as LoRA deltas over one shared base.",
        "",
        *settings,
        "",
        "### On one H100",
        "",
        *_h100_section(totals),
        "",
        "Activations are not included: they are the subject of the GPU measurement that `docs/PERFORMANCE.md` lists",
        "under the next lease. On this CPU, XLA's buffer assignment for the student's LoRA gradient at 1024 px",
        "(4,096 image + 512 caption tokens, bf16, XLA attention, which materialises the 30 x 4,608^2 attention",
        "probabilities of a block) grows by about 10 GiB per block with or without remat, so it says nothing about",
        "a GPU run with cuDNN's fused attention and remat.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv):
    """The arguments; a bad one (a rank < 1, an ``--out`` that is a folder or in a folder that cannot be
    written) is one line ``error: ...`` and exit code 2, before anything is traced."""
    parser = ArgumentParser(prog="benchmarks/model_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank r (the paper: 128)")
    parser.add_argument("--out", default=None, help="also write the document to this file (docs/MODELS.md)")
    args = parser.parse_args(argv)
    if args.rank < 1:
        parser.error(f"--rank must be >= 1, got {args.rank}")
    if args.out is not None:
        folder = os.path.dirname(os.path.abspath(args.out or "."))
        if not args.out:
            parser.error("--out is empty; give the document's file name")
        elif os.path.isdir(args.out):
            parser.error(f"--out {args.out!r} is a folder; give the document's file name")
        elif problem := folder_problem(folder):
            parser.error(f"--out {args.out!r}: its folder {folder!r} {problem}")
    return args


def write_document(document: str, path: str) -> None:
    """``document`` to ``path`` through a temporary file renamed at the end (a failed write leaves the old file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staging = f"{path}.tmp-{os.getpid()}"
    try:
        with open(staging, "w") as f:
            f.write(document)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def main(argv) -> None:
    args = parse_args(argv)
    transformers = {}
    for label, preset in TRANSFORMERS.items():
        print(f"tracing {label} ...", file=sys.stderr, flush=True)
        config = mmdit_config(preset)
        transformers[label] = (config, transformer_sizes(config, args.rank))
    frozen = {label: count_params(make) for label, make in FROZEN_MODELS.items()}
    command = shlex.join(["python", "benchmarks/model_memory.py", *argv])
    document = render(transformers, frozen, args.rank, command, datetime.date.today().isoformat())
    print("tracing Z-Image ...", file=sys.stderr, flush=True)
    zimage = zimage_config("z_image")
    zimage_frozen = {label: count() for label, count in ZIMAGE_FROZEN.items()}
    document += "\n" + render_zimage(zimage, zimage_sizes(zimage, args.rank), zimage_frozen, args.rank)
    print(document)
    if args.out:
        write_document(document, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
