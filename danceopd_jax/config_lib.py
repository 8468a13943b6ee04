"""Building blocks of run configs (``configs/*.py``): model specs, a base config with every key, the paper's SD3.5-M setup."""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def model_spec(preset: str = "tiny", **overrides) -> ConfigDict:
    """A model spec: a DiT (``kind="dit"``: preset plus overrides; ``init`` is ``random`` with ``seed``,
    or ``checkpoint``), or the transformer of the SD3 folder ``config.model_dir`` (``kind="mmdit"``,
    ``init="pretrained"``; ``sd3_spec``).

    ``zero_init=False`` makes a random model a non-zero field (adaLN-Zero would output zero).
    ``checkpoint`` is a workdir of an earlier run (its latest checkpoint, EMA weights if kept).
    ``dtype`` is the compute dtype (parameters stay float32); ``remat`` (none | dots | full) trades
    the student's backward-pass memory for recomputation (``models.layers.REMAT_POLICIES``);
    ``attention`` is ``xla`` (any device) or ``cudnn`` (cuDNN's fused flash attention: NVIDIA GPUs,
    bf16 or fp16 compute; an SD3 run's experts compute like its student). ``kind="field_mlp"`` is the
    field world's ``fieldworld.mlp.FieldMLP`` of ``width`` and ``depth`` (DiT keys unused; ``field_spec``).
    """
    spec = dict(
        kind="dit", preset=preset, patch_size=2, dtype="float32", remat="none", attention="xla", use_source=False, zero_init=True,
        init="random", seed=0, checkpoint="", lora_rank=0, lora_alpha=0.0, lora_targets="", lora_path="", width=128, depth=3,
    )  # fmt: skip
    spec.update(overrides)
    return ConfigDict(spec)


def folder_spec(kind: str, **overrides) -> ConfigDict:
    """The transformer of ``config.model_dir``, a folder of the family whose models are ``kind``
    (``models.backbones``: ``mmdit`` SD3, ``zimage`` Z-Image): a student with a fresh LoRA
    (``lora_rank`` > 0, ``lora_alpha`` 0 = rank, ``lora_targets`` comma-separated ``models.lora``
    patterns), or an expert that is the base plus the LoRA file ``lora_path`` (or the plain base).
    ``use_source``: the model reads the clean source image of edit samples (Z-Image's in-context editing)."""
    return model_spec(**{"kind": kind, "init": "pretrained", "preset": "", "patch_size": 0, **overrides})


def sd3_spec(**overrides) -> ConfigDict:
    """The transformer of an SD3 folder ``config.model_dir`` (``models/sd3.py``; ``folder_spec``)."""
    return folder_spec("mmdit", **overrides)


def zimage_spec(**overrides) -> ConfigDict:
    """The transformer of a Z-Image folder ``config.model_dir`` (``models/zimage_backbone.py``; ``folder_spec``)."""
    return folder_spec("zimage", **overrides)


def field_spec(**overrides) -> ConfigDict:
    """A ``FieldMLP`` of the field world (``fieldworld.mlp``; default width 128, depth 3): points of
    ``config.channels`` numbers, labels over ``config.condition.num_classes`` prompts, edit sources."""
    return model_spec(**{"kind": "field_mlp", "use_source": True, **overrides})


def expert_field(expert: str, cfg_scale: float = 1.0, needs_source: bool = False) -> dict:
    """A field that is one expert (with CFG when ``cfg_scale != 1``).

    ``needs_source``: the field is an editing field, so its routes must draw from a bucket with
    source images (a model may read source tokens and still serve T2I, with no source).
    """
    return dict(kind="expert", expert=expert, cfg_scale=cfg_scale, needs_source=needs_source, terms={})


def random_smoke_models(config: ConfigDict) -> None:
    """The smoke configs' models (``configs/smoke.py``, ``configs/files_smoke.py``): a tiny random student that
    reads source images, a random T2I expert (field ``t2i``) and a random edit expert (field ``edit``, needs sources)."""
    config.student = model_spec(use_source=True, seed=0)
    config.experts = ConfigDict(
        {
            "t2i_expert": model_spec(seed=1, zero_init=False),
            "edit_expert": model_spec(use_source=True, seed=2, zero_init=False),
        }
    )
    config.fields = ConfigDict({"t2i": expert_field("t2i_expert"), "edit": expert_field("edit_expert", needs_source=True)})


def base_config() -> ConfigDict:
    """Every key a run reads, with defaults; configs fill in models, fields, routes and data."""
    config = ConfigDict()
    config.seed = 0
    config.num_train_steps = 100
    config.batch_size = 8  # global samples per step
    # Gradient accumulation (core/microbatches.py): the step computes its loss and gradient in this
    # many microbatches of batch_size / grad_accum_steps samples, for 1/A of the activation memory;
    # same samples, randomness and update as one pass (float summation order aside).
    config.grad_accum_steps = 1

    config.method = "danceopd"  # danceopd | diffusionopd | flowopd | offpolicy | flow_matching
    config.routing = "per_step"  # per_step | per_sample | soft | learned
    # routing == "learned" (core/router.py): the routes' buckets are pooled into one unlabelled
    # stream (a position comes from route m's bucket with probability weight_m); an MLP router,
    # trained on the labels of the pool's first label_fraction (heldout positions at the end are
    # kept apart to measure its accuracy), picks the field of every sample inside the step:
    # argmax | sample (hard) or soft (sum_m p_m v_m, the comparison row).
    config.router = ConfigDict(
        dict(label_fraction=0.05, assign="argmax", hidden=64, train_steps=500, learning_rate=1e-2, weight_decay=1e-4, heldout=512)
    )
    # How per-step routes are drawn (core/route_weights.py): fixed route weights; adaptive (weights
    # follow each route's running loss, never below floor x its base weight); or a curriculum that
    # moves them linearly to ``end`` (route name -> weight) over curriculum_steps.
    config.route_weights = ConfigDict(
        dict(schedule="fixed", ema_decay=0.9, temperature=1.0, floor=0.2, curriculum_steps=0, end=ConfigDict())
    )
    config.rollout_steps = 16
    config.shift = 1.0
    # The rollout's sigma grid (core/schedule.py): uniform = shift(linspace(1, 0, N + 1));
    # flow_match_euler = diffusers' FlowMatchEulerDiscreteScheduler grid, which SD3 pipelines use.
    config.sigma_schedule = "uniform"
    config.query_sampler = "low_t"
    config.queries_per_rollout = 1
    config.condition_dropout = 0.0  # flow_matching only
    config.fm_time_sampler = "logit_normal"  # flow_matching only: logit_normal | uniform
    # flowopd only (docs/METHOD.md baselines; core/flowopd.py): SDE noise level, advantage =
    # clip(kl_scale * KL, +-advantage_clip), PPO ratio clip. The paper's "group size 16" is the batch.
    config.flowopd = ConfigDict({"eta": 0.7, "kl_scale": -1.0, "advantage_clip": 5.0, "ppo_clip": 1e-4})

    config.image_size = 32
    config.channels = 3
    # pooled_dim > 0: a pooled prompt embedding too (SD3: text_len = 77 + T5 tokens, text_dim and
    # pooled_dim those of the folder's transformer; Z-Image: text_len = the caption's token capacity,
    # up to 512 in its pipelines, text_dim = Qwen3's width, 2560, pooled_dim 0).
    config.condition = ConfigDict(dict(text_len=0, text_dim=0, num_classes=0, use_source=False, pooled_dim=0))
    # A diffusers pipeline folder of a known family (models/backbones.py: SD3 / SD3.5, kind="mmdit";
    # Z-Image, kind="zimage"), read from its model_index.json: its transformer is the shared frozen base
    # of every model, and its text encoders encode the prompts; image_size and channels are then the
    # latent size and channels.
    config.model_dir = ""
    # One .safetensors file holding the transformer's weights in place of model_dir/transformer/'s
    # (the folder still gives the configs, text encoders and VAE): diffusers' names, or for SD3 also
    # Stability AI's original ones (model.diffusion_model.joint_blocks.N..., fused qkv; an all-in-one
    # file's VAE and text-encoder tensors are ignored), models/sd3_original.py. "" = the folder's weights.
    config.transformer_path = ""
    # A model folder run's prompts encoded beforehand (python -m danceopd_jax.encode_prompts --model_dir D
    # --prompts FILE --out TABLE.safetensors): the run reads this table instead of loading the text
    # encoders, so model_dir may lack them. It must hold every prompt of the buckets and the empty
    # prompt (the CFG null), at config.condition's shape. "" = encode into WORKDIR/prompt_embeddings.safetensors.
    config.prompt_embeddings = ""

    config.student = model_spec()
    config.experts = ConfigDict()
    config.fields = ConfigDict()
    config.routes = ConfigDict()
    config.data = ConfigDict(dict(buckets={}))

    config.optimizer = ConfigDict(
        dict(learning_rate=1e-3, warmup_steps=0, decay="cosine", weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999, ema_decay=0.0)
    )
    # A step whose loss or gradient norm is not finite: False stops the run with an error naming the
    # step and route; True keeps the old params/optimizer state/EMA on device and counts it (skipped_steps).
    config.skip_nonfinite_steps = False
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Multi-slice TPU or multi-host GPU: each axis's outer factor across the data-centre network
    # (slices, or processes where devices have no slice index; -1 fills). ``mesh`` is then the
    # inner factor within one slice or host: axis a spans dcn_mesh[a] * mesh[a] devices. All 1: flat.
    config.dcn_mesh = ConfigDict(dict(data=1, fsdp=1, tensor=1))
    # Logical axis -> mesh axes (``parallel.axis_rules``; axes left out are replicated): parameters
    # (embed over fsdp, heads and mlp over tensor) and the activations the models pin
    # (``models.layers.ACTIVATION_AXES``: batch over data x fsdp, heads and MLP hidden over tensor).
    config.logical_axis_rules = ConfigDict(
        dict(embed="fsdp", heads="tensor", mlp="tensor", activation_batch=("data", "fsdp"), activation_heads="tensor",
             activation_mlp="tensor")
    )  # fmt: skip
    config.expert_sharding = "like_student"  # like_student (the rules above) | replicated (a full copy per device)
    # Persistent XLA compilation cache: relative to the workdir or absolute (shared by runs); "" is off.
    # A cache already set in the process (JAX_COMPILATION_CACHE_DIR, jax.config) takes precedence.
    config.compilation_cache_dir = "xla_cache"

    config.log_every = 10
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    config.loss_log = False  # append {"step", "loss", "route"} per step to WORKDIR/losses.jsonl (process 0)
    # Every sample_every steps (0: never), each route's first samples_per_route bucket records sampled by
    # the student from fixed noise, as TensorBoard images samples/ROUTE (training_samples.py; DiT runs).
    config.sample_every = 0
    config.samples_per_route = 4
    return config


# The paper's student LoRA targets ("attention q, k, v, out and the MLP", docs/METHOD.md "Paper setup") as
# ``models.lora`` patterns over the MMDiT's layer names (diffusers' module names; ``fc1`` / ``fc2`` are
# diffusers' ``net.0.proj`` / ``net.2``): the joint attention's projections of both streams (``to_*``
# for image tokens, also SD3.5's ``attn2``; ``add_*_proj`` / ``to_add_out`` for text) and both MLPs.
SD3_LORA_TARGETS = "to_q,to_k,to_v,to_out,add_q_proj,add_k_proj,add_v_proj,to_add_out,fc1,fc2"
# The authors' Z-Image student targets: the single-stream blocks' attention q, k, v, out and the SwiGLU
# w1, w2, w3 (diffusers' module names of ``ZImageTransformer2DModel``, also its refiner blocks').
ZIMAGE_LORA_TARGETS = "to_q,to_k,to_v,to_out,w1,w2,w3"


def run_sigma_schedule(run_config: ConfigDict) -> str:
    """The sigma schedule a run rolled out on; runs saved before ``sigma_schedule`` existed used ``uniform``."""
    return run_config.get("sigma_schedule", "uniform")


def sd35_medium_recipe() -> ConfigDict:
    """The paper's SD3.5-Medium training setup (docs/METHOD.md "Paper setup"; the authors' release) with no
    fields yet: configs add experts, fields and routes.

    A rank-128 / alpha-128 LoRA student on ``SD3_LORA_TARGETS`` in bf16 compute with full remat
    (the authors' release checkpoints gradients too); AdamW at a constant 2e-4, no weight decay,
    gradient clip 1.0; 3000 steps of 16-step rollouts on SD3.5's scheduler grid (diffusers'
    ``FlowMatchEulerDiscreteScheduler``, shift 3.0, as the authors' release rolls out),
    low-t queries; 1024 px images = 128 x 128 x 16 latents; prompts as 77 CLIP + 256 T5 tokens
    (text_dim 4096, pooled 2048) read from the prompt file ``data.buckets.prompts.path`` (all of
    it: ``size`` 0). The paper's batch: 4 samples per update as 4 microbatches of one sample
    (``grad_accum_steps`` 4: the activation memory of one sample), one route per update. On
    several data-parallel devices, give each a share of every microbatch with a smaller
    ``grad_accum_steps`` (e.g. 1 on 4 GPUs): the same update, in less time.

    ``model_dir`` (the SD3.5-Medium diffusers folder) and the prompt file are required values left
    to the command line (``placeholder``: unset, validation stops with one line naming the key).
    """
    config = base_config()
    config.model_dir = placeholder(str)
    config.num_train_steps = 3000
    config.batch_size = 4
    config.grad_accum_steps = 4
    config.rollout_steps = 16
    config.shift = 3.0
    config.sigma_schedule = "flow_match_euler"
    config.query_sampler = "low_t"
    config.image_size = 128
    config.channels = 16
    config.condition.update(dict(text_len=77 + 256, text_dim=4096, pooled_dim=2048))
    config.student = sd3_spec(lora_rank=128, lora_alpha=128.0, lora_targets=SD3_LORA_TARGETS, dtype="bfloat16", remat="full")
    config.data.buckets = ConfigDict({"prompts": dict(kind="prompt_file", size=0, seed=0, path=placeholder(str))})
    config.optimizer.update(dict(learning_rate=2e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0))
    config.log_every = 20
    config.checkpoint_every = 300
    return config


def zimage_recipe() -> ConfigDict:
    """The paper's Z-Image composition setup (docs/METHOD.md "Paper setup", and the authors' release)
    with no fields, routes or buckets yet: configs add them.

    A rank-128 / alpha-128 LoRA student on ``ZIMAGE_LORA_TARGETS`` reading the clean source image of
    edit samples (in-context editing, ``use_source``), bf16 compute with full remat; AdamW at a
    constant 2e-4, no weight decay, clip 1.0; 3000 steps of 16-step rollouts on the Z-Image
    pipelines' grid (``linspace(1, 0, N + 1)`` shifted by 3: ``uniform`` with shift 3), low-t
    queries; 1024 px = 128 x 128 x 16 latents; captions of up to 512 Qwen3 tokens (width 2560,
    no pooled embedding). 4 samples per update as 4 microbatches of one, one route per update.
    ``model_dir`` (the Z-Image diffusers folder) is a required value left to the command line.
    """
    config = base_config()
    config.model_dir = placeholder(str)
    config.num_train_steps = 3000
    config.batch_size = 4
    config.grad_accum_steps = 4
    config.rollout_steps = 16
    config.shift = 3.0
    config.sigma_schedule = "uniform"
    config.query_sampler = "low_t"
    config.image_size = 128
    config.channels = 16
    config.condition.update(dict(text_len=512, text_dim=2560, use_source=True))
    config.student = zimage_spec(
        lora_rank=128, lora_alpha=128.0, lora_targets=ZIMAGE_LORA_TARGETS, dtype="bfloat16", remat="full", use_source=True
    )
    config.optimizer.update(dict(learning_rate=2e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0))
    config.log_every = 20
    config.checkpoint_every = 300
    return config


def zimage_teacher(lora_path) -> ConfigDict:
    """A frozen Z-Image expert over the shared base (in bf16, like the student): the plain base, or the
    base plus the LoRA file ``lora_path``; it reads the source image of edit samples."""
    return zimage_spec(lora_path=lora_path, dtype="bfloat16", use_source=True)
