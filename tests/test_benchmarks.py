"""The benchmark scripts run (tiny sizes) and their rollout cross-check holds; no timing is asserted."""

import gzip
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_step_benchmark_runs_and_scan_matches_python_loop():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--presets", "tiny", "--steps", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("tiny")]
    assert len(rows) == 1, result.stdout
    assert "yes" in rows[0], rows[0]  # lax.scan and Python-loop rollouts give the same states


def test_step_benchmark_counts_the_traced_step():
    """step.py's FLOPs are the traced train step's: for every length of the truncated rollout its
    parts add up to the whole step's traced program (``lax.switch`` over both routes, the rollout's
    while loop run that many times); the rollout forward is the analytic one; the timed steps' trip
    counts are read at the train steps the donated executable really ran."""
    bench = load_benchmark("step")
    from measure import matmul_flops  # beside the script, on the path load_script set

    from danceopd_jax.models import dit

    args = bench.parse_args(["--presets", "tiny", "--image-size", "8"])
    config = bench.benchmark_config("tiny", args)
    run = bench.setup_run(config)
    [(route, batch)] = bench.draw_batches(run, 1)
    flops = bench.timed_flops(run, batch, [4, 6, 8])
    passes, trips = flops["passes"], flops["rollout_trips"]
    jaxpr = jax.make_jaxpr(run.step_fn)(run.state, run.experts, batch, jnp.int32(route)).jaxpr
    assert [bench.step_flops(passes, n) for n in range(4)] == [matmul_flops(jaxpr, while_trips=n) for n in range(4)]
    with pytest.raises(ValueError, match="while_trips"):
        matmul_flops(jaxpr)
    student = bench.build.model_config(config, config.student)
    assert passes["forward"] == dit.forward_flops(student, 2, config.condition.text_len) and passes["prepare"] == 0
    assert len(trips) == 3 and all(0 <= n <= 3 for n in trips)
    assert flops["total"] == sum(bench.step_flops(passes, n) for n in trips) / 3
    assert flops["rollout"] + flops["teacher"] + flops["student"] == pytest.approx(flops["total"])

    seen = []  # the executables take turns and thread the state: each call runs the next train step

    def fake(state, experts, batch, route):
        seen.append(int(state.step))
        return state.replace(step=state.step + 1), {}

    run.state = run.state.replace(step=jnp.int32(3))
    _, ran = bench.time_steps(run, {"donated": fake, "kept": fake}, [(route, batch)] * 4, warmup=2)
    assert seen == list(range(3, 11)) and ran == {"donated": [7, 9], "kept": [8, 10]}


def test_step_throughput_benchmark_runs_and_counts_flops(tmp_path):
    """The LoRA-MMDiT step (truncated and full rollout) and its passes run in their own process and
    land in the Markdown table and the JSON beside it, the frozen base stored in bf16 as a run
    stores it. Its FLOPs: the traced forward is the analytic one; the timed steps' rollouts run the
    Euler steps their keys draw; the LoRA student's pass costs more than 2 forwards (the adapters,
    attention's backward) and a full one's 3."""
    out = tmp_path / "perf.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--models", "MMDiT-tiny",
           "--resolutions", "32", "--batch-size", "2", "--rollout-steps", "4", "--dtype", "bfloat16", "--steps", "3",
           "--peak-tflops", "1", "--out", str(out), "--profile", str(tmp_path / "profile")]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [r] = json.loads(out.with_suffix(".json").read_text())
    assert (r["model"], r["px"], r["latent"], r["batch"]) == ("MMDiT-tiny", 32, 4, 2) and "error" not in r, r
    assert all(r[k] > 0 for k in ("step_s", "step_full_s", "rollout_s", "rollout_full_s", "teacher_s", "student_s"))
    assert len(r["step_times_s"]) == 3 and r["step_s"] == sum(r["step_times_s"]) / 3
    assert r["step_peak_bytes"] > 0
    assert r["params"] < r["frozen"]  # the LoRA student trains adapters over a frozen base
    assert r["cast"] == "once" and r["frozen_bytes"] < 4 * r["frozen"]  # frozen bf16 layers stored in bf16 (the float32 positional table dominates here)
    f = r["flops"]
    bench = load_benchmark("step_throughput")
    args = bench.parse_args(["--rollout-steps", "4"])
    choice = bench.MODELS["MMDiT-tiny"]
    config = bench.model_config(choice, 4, args)
    from danceopd_jax.models import dit, mmdit

    assert f["forward"] == mmdit.forward_flops(config, 2, 4, bench.SD3_TEXT_LEN)
    assert f["forward"] < f["teacher"] < 1.5 * f["forward"]  # the expert's LoRA runs unfolded: its products count
    assert f["prepare"] > 0  # the adapter fold
    assert 2 * f["forward"] < f["student"] < 3 * f["forward"], f
    assert f["rollout_trips"] == bench.rollout_trips(2, args, [2, 3, 4]) and all(0 <= n <= 3 for n in f["rollout_trips"])
    assert f["step"] == sum(bench.step_flops(f, n) for n in f["rollout_trips"]) / 3 and f["step"] <= f["step_full"]
    assert "| MMDiT-tiny | 32 | 2 |" in out.read_text()
    assert r["kernels"] is None and "No device events in the trace (cpu backend)" in out.read_text()  # CPU: no device kernels
    again = bench.parse_args(["--recount", str(out.with_suffix(".json")), "--rollout-steps", "4", "--steps", "3", "--peak-tflops", "1"])
    [row] = [line.strip("| ").split(" | ") for line in bench.recount(again)[2:]]
    assert row[:3] == ["MMDiT-tiny", "32", "2"] and row[4:6] == row[6:8], row  # recounted as it was counted

    mesh = bench.parallel.make_mesh({"data": -1})
    choice = bench.MODELS["DiT-XL/2"]
    rules = bench.parallel.axis_rules({k: v for k, v in bench.base_config().logical_axis_rules.items() if k in dit.LOGICAL_AXES}, dit.LOGICAL_AXES)
    passes = bench.pass_flops(choice, 32, 1, args, mesh, rules)
    assert passes["forward"] == passes["teacher"] == dit.forward_flops(bench.model_config(choice, 32, args), 1) and passes["prepare"] == 0
    assert abs(passes["teacher"] / 2 - 118.6e9) < 0.01 * 118.6e9  # DiT-XL/2 at 256 px: 118.6 GMACs (Peebles & Xie, Table 4)
    assert 2.9 * passes["forward"] < passes["student"] <= 3 * passes["forward"]  # no input gradient of the patch embedding
    remat = bench.parse_args(["--rollout-steps", "4", "--remat", "full", "--attention", "xla"])
    assert bench.pass_flops(choice, 32, 1, remat, mesh, rules) == passes  # recomputation is not model work


def test_grad_accumulation_benchmark_shows_less_memory_for_the_same_loss():
    """Four microbatches of the tiny DiT's step at 128 px hold well under half the temporaries of one
    pass (activations dominate them at this size) and give the same first loss; the table says so."""
    bench = load_benchmark("grad_accumulation")
    args = bench.parse_args(["--model", "DiT-tiny/2", "--px", "128", "--batch-size", "8", "--accum", "1,4", "--rollout-steps", "3",
                             "--steps", "1"])  # fmt: skip
    one, four = bench.measure_accumulations(args)
    assert (one["microbatch"], four["microbatch"]) == (8, 2)
    assert four["temp_bytes"] < 0.5 * one["temp_bytes"] and four["peak_bytes"] < one["peak_bytes"]
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5) and one["step_s"] > 0
    text = bench.table(args, [one, four])
    assert "| 4 | 2 |" in text and "First-step losses differ by at most" in text


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("step", ["--presets", "tiny,foo"], "error: --presets: unknown preset 'foo'; valid: tiny, mini, S, B, L, XL"),
        ("step", ["--presets", ""], "error: --presets: unknown preset ''; valid: tiny, mini, S, B, L, XL"),
        ("step", ["--presets", "tiny", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
        ("step", ["--presets", "tiny", "--image-size", "-16"], "error: --image-size must be >= 1, got -16"),
        ("step", ["--presets", "tiny", "--image-size", "15"], "error: preset tiny: config.student.patch_size: image_size 15 is not divisible by patch size 2"),
        ("step", ["--presets", "tiny", "--steps", "0"], "error: --steps must be >= 1, got 0"),
        ("step", ["--presets", "tiny", "--peak-tflops", "-1"], "error: --peak-tflops must be a positive number, got -1.0"),
        ("step", ["--presets", "tiny", "--cfg-scale", "nan"], "error: --cfg-scale must be a finite number >= 0, got nan"),
        ("step", ["--presets", "tiny", "--dtype", "float16"], "error: argument --dtype: invalid choice: 'float16' (choose from 'float32', 'bfloat16')"),
        ("grad_accumulation", ["--accum", "1,3"], "error: --accum: [3] do not split the batch of 16 into microbatches over 1 device(s)"),
        ("grad_accumulation", ["--accum", "1,x"], "error: --accum: '1,x' is not a comma-separated list of integers"),
        ("grad_accumulation", ["--px", "100"], "error: --px: 100 is not divisible by 16 (latent / 8, patch 2)"),
        ("grad_accumulation", ["--steps", "-1"], "error: --steps: must be >= 0, got -1"),
        ("model_init", ["--models", "DiT-B/2,DiT-H/2"], "error: --models: unknown ['DiT-H/2']; valid: DiT-B/2, DiT-XL/2, SD3.5-M"),
        ("model_init", ["--repeats", "0"], "error: --repeats: must be >= 1, got 0"),
        ("sweep_compile", ["--key", "optimizer.nope"], "error: --key: the config has no key 'optimizer.nope'"),
        ("sweep_compile", ["--values", "1e-3"], "error: --values: a sweep needs at least 2 values, got [0.001]"),
        ("sweep_compile", ["--values", "1e-3,abc"], "error: --values: optimizer.learning_rate='abc': expected a float"),
        ("sweep_compile", ["--key", "rollout_steps", "--values", "4,0"], "error: --values: rollout_steps=0: config.rollout_steps: must be an integer >= 1, got 0"),
        ("sweep_compile", ["--preset", "Q"], "error: --preset: unknown preset 'Q'; valid: tiny, mini, S, B, L, XL"),
        ("sweep_compile", ["--ways", "arguments,baked"], "error: --ways: unknown ['baked']; valid: arguments, constants"),
    ],
)
def test_benchmark_rejects_bad_arguments_in_one_line(script, argv, message, capsys):
    bench = load_benchmark(script)
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == message


def test_model_init_benchmark_builds_each_model_both_ways_with_both_key_sources(capsys):
    load_benchmark("model_init").main(["--models", "DiT-B/2", "--repeats", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| DiT-B/2 |")]
    assert [(row[2].strip(), row[1].strip()) for row in rows] == [("eval_shape", "130M"), ("jit trace", "130M")]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 and row[5].strip().endswith("x") for row in rows)


def test_sweep_benchmark_compiles_a_learning_rate_sweep_once(capsys):
    """Each point in a new process: with the step numbers as arguments (as a run takes them) the second
    learning rate loads the first one's program from the cache."""
    load_benchmark("sweep_compile").main(["--values", "1e-3,3e-4", "--ways", "arguments"])
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()[4:]]
    assert [(row[0], row[1], row[4]) for row in rows] == [("0.001", "arguments", "yes"), ("0.0003", "arguments", "no")]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)


def test_step_throughput_compilation_cache_serves_a_second_call(tmp_path):
    """With ``--compilation-cache`` the first call compiles the step and the second, on the same
    shapes, loads it from the cache and says so; both time a finite step."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--models", "DiT-tiny/2", "--resolutions", "32",
           "--batch-size", "2", "--rollout-steps", "3", "--dtype", "float32", "--steps", "1", "--no-parts", "--no-full-rollout",
           "--compilation-cache", str(tmp_path / "cache")]  # fmt: skip
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}.md"
        result = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        [r] = json.loads(out.with_suffix(".json").read_text())
        runs.append((r, result.stdout))
    (first, first_log), (second, second_log) = runs
    assert not first["step_cached"] and second["step_cached"], (first, second)
    assert "(cached)" not in first_log and "(cached)" in second_log
    assert first["step_s"] > 0 and second["step_s"] > 0
    assert any(p.is_file() for p in (tmp_path / "cache").iterdir())


def gpu_trace(path: pathlib.Path, with_ops_thread: bool) -> pathlib.Path:
    """A Chrome trace in the profiler's shape: a host process and a GPU with one stream thread of
    kernels (two overlapping) and, optionally, a derived ``XLA Ops`` thread."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8, "args": {"name": "XLA Ops"}},
    ]
    kernels = [  # (name, start us, duration us)
        ("nvjet_tst_192x192_64x4_2x1_v_bz_TNT", 0, 400),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", 400, 300),
        ("loop_multiply_fusion_3", 700, 200),
        ("MemcpyD2D", 850, 100),  # overlaps the fusion by 50 us
    ]
    events = [{"ph": "X", "pid": 2, "tid": 7, "name": n, "ts": t, "dur": d} for n, t, d in kernels]
    events.append({"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 5000})  # host: ignored
    if with_ops_thread:
        events.append({"ph": "X", "pid": 2, "tid": 8, "name": "fusion.3", "ts": 0, "dur": 600,
                       "args": {"long_name": "%fusion.3 = bf16[8,8]{1,0} fusion(bf16[8,8]{1,0} %p.1), kind=kCustom, calls=%gemm_fusion_dot.3"}})  # fmt: skip
        events.append({"ph": "X", "pid": 2, "tid": 8, "name": "loop_add_fusion", "ts": 600, "dur": 100,  # reads the GEMM
                       "args": {"long_name": "%loop_add_fusion = bf16[8,8]{1,0} fusion(bf16[8,8]{1,0} %fusion.3, bf16[8,8]{1,0} %copy.2), kind=kLoop, calls=%fused_add"}})  # fmt: skip
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    return path


def test_kernel_profile_splits_device_time_by_category(tmp_path):
    """Device kernels are summed by category per call, overlapping streams count once in the busy
    time, host events are ignored, and an ``XLA Ops`` thread replaces the kernels it derives from."""
    profile = load_benchmark("kernel_profile")
    s = profile.summarise(gpu_trace(tmp_path / "a.trace.json.gz", with_ops_thread=False), calls=2)
    assert s["category_ms"] == pytest.approx({"attention": 0.15, "matmul": 0.2, "collective": 0.0, "copy": 0.05, "other": 0.1})
    assert (s["busy_ms"], s["span_ms"]) == pytest.approx((0.475, 0.475))  # 950 us of union over 2 calls
    assert s["top"][0] == ["nvjet_tst_192x192_64x4_2x1_v_bz_TNT", pytest.approx(0.2), 0.5]
    assert any("| matmul (" in line for line in profile.table(s, flops_per_call=1e9))

    ops = profile.summarise(gpu_trace(tmp_path / "b.trace.json.gz", with_ops_thread=True), calls=1)
    assert ops["category_ms"] == pytest.approx({"attention": 0.0, "matmul": 0.6, "collective": 0.0, "copy": 0.0, "other": 0.1})  # the Triton GEMM fusion by its calls=; the add by its own name, not its operands

    with jax.profiler.trace(str(tmp_path / "cpu")):  # the CPU backend's ops run in host threads
        jax.block_until_ready(jax.jit(lambda x: x @ x)(jnp.ones((64, 64))))
    assert profile.summarise(profile.latest_trace(tmp_path / "cpu"), calls=1) is None


def test_data_benchmark_reads_files_and_cached_latents(capsys):
    """benchmarks/data.py at a tiny size: every read (cold decode with 1 and 2 threads, warm cached
    latents as records and as batches) gives a figure against the step's need; bad arguments are one line."""
    bench = load_benchmark("data")
    results = bench.main(["--px", "64", "--images", "8", "--repeats", "1", "--workers", "2"])
    assert [r["read"].split(",")[0] for r in results] == ["cold: decode + resize"] * 2 + ["warm: cached latents"] * 2
    assert all(r["px"] == 64 and r["samples_per_s"] > 0 and r["need"] == 88.2 for r in results)
    assert capsys.readouterr().out.count("| 64 |") == 4
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--px", "100"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == "error: --px: [100] must be multiples of 8 (the VAE's downsampling)"
