"""A tiny training run end to end: VAE, latent cache, DiT + T5 with context frames, checkpoints, resume, export."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from soragen.config import load_config, read_yaml
from soragen.errors import UserError
from soragen.model_io import builtin_installed
from soragen.pipeline import Pipeline
from soragen.train import RunFolder, sample_windows, train

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "text_encoder.tokenizer=words", "text_encoder.d_model=32", "text_encoder.num_layers=1", "text_encoder.num_heads=2",
    "text_encoder.d_kv=16", "text_encoder.d_ff=64", "text_encoder.max_length=24",
    "vae.channels=[8,8,16,16]", "vae.temporal_channels=16", "vae.latent_channels=4",
    "dit.width=32", "dit.depth=1", "dit.heads=2",
    "data.clips=8", "data.clip_latent_frames=4", "train.dit.window=3", "train.dit.max_context=2",
    "train.vae.steps=3", "train.vae.batch_size=2", "train.vae.clip_frames=5",
    "train.dit.steps=4", "train.dit.batch_size=4", "train.dit.warmup=1",
    "train.checkpoint_every=2", "train.sample_every=1000", "train.log_every=2",
    "sampler.steps=2", "video.seconds=1", "train.vae_gate_clips=2",
]


def train_config(overrides: list[str]):
    """A training config from the schema defaults (as `soragen train` without --config), not the built-in model's."""
    return load_config(None, overrides, builtin_default=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = train_config(TINY + [f"train.output_dir={root}"])
    model = train(cfg)
    return cfg, root, model


def test_model_folder_keeps_no_paths_of_the_run(trained, tmp_path):
    """A model folder's config holds the model, not the run: a fine-tune of it writes to its own output folder."""
    import yaml

    cfg, root, model = trained
    stored = yaml.safe_load((model / "soragen.yaml").read_text())
    assert str(root) not in (model / "soragen.yaml").read_text()
    assert stored["train"]["vae_model"] is None and stored["train"]["dit"]["init_model"] is None
    assert stored["dit"] == cfg.dit.model_dump(mode="json") and stored["train"]["dit"]["steps"] == cfg.train.dit.steps
    assert load_config(None, [f"model={model}"]).train.output_dir == "runs/default"


def test_model_folder_records_the_rate_of_its_training_clips(trained, tmp_path, caplog):
    """The Shapes World is drawn at 8 fps whatever video.fps a training config gives; a manifest at its records' rate."""
    from soragen.train import with_data_rate

    _, _, model = trained
    assert load_config(None, [f"model={model}", "video.fps=24"]).video.model_fps == 8
    assert with_data_rate(train_config(["video.fps=24"])).video.model_fps == 8
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"path": "a.mp4", "caption": "x", "fps": 24}\n{"path": "b.mp4", "caption": "y", "fps": 24}\n')
    data = ["data.kind=manifest", f"data.path={tmp_path}"]
    assert with_data_rate(train_config(data)).video.model_fps == 24
    manifest.write_text('{"path": "a.mp4", "caption": "x", "fps": 24}\n{"path": "b.mp4", "caption": "y", "fps": 30}\n')
    with caplog.at_level("WARNING", logger="soragen"):
        assert with_data_rate(train_config(data + ["video.fps=12"])).video.model_fps == 12
    assert "no single whole-number frame rate" in caplog.text
    manifest.write_text('{"path": "a.mp4", "caption": "x", "fps": 120}\n')
    with pytest.raises(UserError, match="clips are 120 fps; soragen models make 1 to 60 fps"):
        with_data_rate(train_config(data))


def test_run_writes_model_folder_and_checkpoints(trained):
    cfg, root, model = trained
    run = RunFolder(root)
    assert (model / "soragen.yaml").is_file() and (model / "tokenizer" / "tokenizer.json").is_file()
    assert run.latest("vae").name == "vae-0000003" and run.latest("dit").name == "dit-0000004"
    assert len(list(run.checkpoints.glob("dit-*"))) == cfg.train.keep_checkpoints
    assert not list(run.checkpoints.glob(".*"))  # no half-written checkpoint
    metrics = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    dit_lines = [m for m in metrics if m["stage"] == "dit" and "loss" in m]
    assert dit_lines and all(np.isfinite(m["loss"]) and "text_gap" in m for m in dit_lines)
    # the exported model generates, and its latents are normalised with the fitted statistics
    mcfg = load_config(None, [f"model={model}"])
    assert mcfg.vae.latent_std is not None and len(mcfg.vae.latent_std) == 4
    pipe = Pipeline.from_config(mcfg)
    sidecar = pipe.generate("a red circle moving left", root / "v.mp4")
    assert sidecar["video"]["frames"] == 8


def test_resume_continues_from_checkpoint(trained):
    cfg, root, _ = trained
    more = train_config(TINY + [f"train.output_dir={root}", "train.dit.steps=6"])
    train(more, resume=True)
    assert RunFolder(root).latest("dit").name == "dit-0000006"
    steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == "dit" and "loss" in json.loads(line)]
    assert steps[-1] == 6 and 5 not in steps[:-1]  # continued at step 5, not from 0


def test_stop_after_then_resume_with_other_settings(tmp_path):
    """train.dit.stop_after stops with a checkpoint and no model; --resume (here with frame noise) finishes, and
    clears a checkpoint left half-written by a killed process (SIGKILL leaves its temporary folder)."""
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.stop_after=2"])
    assert train(cfg) == tmp_path
    assert RunFolder(tmp_path).latest("dit").name == "dit-0000002" and not (tmp_path / "model").exists()
    (tmp_path / "checkpoints" / ".dit-0000003.killed" / "state").mkdir(parents=True)
    more = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.frame_noise=0.5"])
    assert train(more, resume=True) == tmp_path / "model"
    assert RunFolder(tmp_path).latest("dit").name == "dit-0000004" and (tmp_path / "model" / "soragen.yaml").is_file()
    assert not list((tmp_path / "checkpoints").glob(".*"))


@pytest.mark.parametrize("first, then", [
    (["dit.width=32"], ["dit.width=48"]),  # another model size
    (["train.dit.text_binding=0.5"], []),  # a part (the binding probe) fewer
    ([], ["train.dit.text_binding=0.5"]),  # a part more
])
def test_resume_with_settings_its_checkpoint_cannot_hold_names_the_checkpoint(tmp_path, first, then):
    """One clear error, not a state-dict traceback; the run folder's config.yaml still describes its checkpoint."""
    train(train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.stop_after=2"] + first))
    written = (tmp_path / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"checkpoint .*dit-0000002 does not fit this run's settings") as err:
        train(train_config(TINY + [f"train.output_dir={tmp_path}"] + then), resume=True)
    assert "\n" not in str(err.value)
    assert (tmp_path / "config.yaml").read_text() == written
    assert RunFolder(tmp_path).latest("dit").name == "dit-0000002"


@pytest.mark.parametrize("damage", ["state/model.safetensors", "meta.json", "ema.safetensors", "state/scheduler.bin",
                                    "state/optimizer.bin"])
def test_resume_from_a_damaged_checkpoint_names_it(tmp_path, damage):
    """A checkpoint file cut short (a disk filled, a copy interrupted): one line naming the checkpoint, not a
    traceback; deleting it resumes from the one before."""
    train(train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.stop_after=4"]))
    ckpt = RunFolder(tmp_path).latest("dit")
    target = ckpt / damage
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    more = train_config(TINY + [f"train.output_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"checkpoint .*dit-0000004 is damaged") as err:
        train(more, resume=True)
    assert "\n" not in str(err.value) and "delete it to resume from the one before" in str(err.value)
    shutil.rmtree(ckpt)
    assert train(more, resume=True) == tmp_path / "model"


def test_a_resume_refused_by_the_vae_stage_keeps_the_run_described(tmp_path):
    """--resume with a VAE that the finished VAE stage's weights do not fit: one line, and config.yaml still
    describes what the folder holds (as for a DiT checkpoint that does not fit)."""
    train(train_config(TINY + [f"train.output_dir={tmp_path}", "train.stages=[vae]"]))
    written = (tmp_path / "config.yaml").read_text()
    with pytest.raises(UserError, match="vae.*has shape"):
        train(train_config(TINY + [f"train.output_dir={tmp_path}", "vae.latent_channels=8"]), resume=True)
    assert (tmp_path / "config.yaml").read_text() == written


def test_a_new_run_refused_before_its_first_step_leaves_no_folder(tmp_path):
    """A new run whose VAE does not fit its settings: one line, and no run folder (nor the folders above it that
    it made) left behind holding a config.yaml of a run that never began; a folder that was there stays."""
    settings = ["train.stages=[dit]", "train.vae_model=builtin", "vae.latent_channels=4"]
    with pytest.raises(UserError, match=r"weights file \S+ (lacks|has)"):
        train(train_config(TINY + [f"train.output_dir={tmp_path / 'new' / 'run'}"] + settings))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match=r"weights file \S+ (lacks|has)"):
        train(train_config(TINY + [f"train.output_dir={tmp_path / 'kept'}"] + settings))
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_non_empty_run_folder_needs_resume(trained):
    cfg, root, _ = trained
    with pytest.raises(UserError, match="--resume"):
        train(cfg)


def test_context_windows():
    from soragen.config import DiTTrainConfig

    t = DiTTrainConfig(window=9, max_context=4, context_fraction=0.5)
    rng = np.random.default_rng(0)
    continues = [False] * 50 + [True] * 50
    idx, starts, ctx = sample_windows(rng, continues, 100, 11, t, 2000)
    cont = np.array(continues)[idx]
    assert (ctx[cont] >= 1).all() and (starts[cont] >= 1).all()  # long-trajectory windows always have context
    t2v = ~cont & (ctx == 0)
    assert (starts[t2v] == 0).all() and 0.3 < t2v.sum() / (~cont).sum() < 0.7
    assert ctx.max() == 4 and (starts + 9 <= 11).all()


def test_context_frames_carry_no_loss():
    """Changing the prediction target on context frames does not change the loss."""
    from diffusers import DDPMScheduler

    from soragen.train import dit_loss

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")

    class Probe(torch.nn.Module):
        def __init__(self, frame_value):
            super().__init__()
            self.frame_value = frame_value

        def forward(self, x, t, text, mask):
            out = torch.zeros_like(x)
            out[:, :, 0] = self.frame_value  # only frame 0 differs
            return out

    x0 = torch.randn(2, 4, 3, 2, 2)
    text, mask = torch.zeros(2, 1, 8), torch.ones(2, 1, dtype=torch.bool)
    ctx = torch.tensor([1, 1])
    losses = [dit_loss(Probe(v), sched, x0, text, mask, ctx, 20, torch.Generator().manual_seed(0)) for v in (0.0, 5.0)]
    assert torch.equal(losses[0], losses[1])
    no_ctx = [dit_loss(Probe(v), sched, x0, text, mask, torch.tensor([0, 0]), 20, torch.Generator().manual_seed(0)) for v in (0.0, 5.0)]
    assert not torch.equal(no_ctx[0], no_ctx[1])


@pytest.mark.parametrize("power, upper_half", [(1.0, 0.5), (2.0, 0.75)])
def test_timestep_power_biases_training_towards_noise(power, upper_half):
    """t = T * u**(1/p): the share of windows in the noisier half is 1 - 0.5**p."""
    from diffusers import DDPMScheduler

    from soragen.train import dit_loss

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, text, mask):
            seen.append(t[:, -1])
            return torch.zeros_like(x)

    x0 = torch.zeros(4000, 1, 2, 1, 1)
    text, mask = torch.zeros(4000, 1, 2), torch.ones(4000, 1, dtype=torch.bool)
    dit_loss(Recorder(), sched, x0, text, mask, torch.zeros(4000, dtype=torch.long), 20,
             torch.Generator().manual_seed(0), timestep_power=power)
    t = seen[0]
    assert t.min() >= 0 and t.max() <= 999
    assert abs((t >= 500).float().mean().item() - upper_half) < 0.03


def test_unit_variance_weighting_makes_every_noise_level_count_alike():
    """A model that predicts 0 has loss E[v^2] = alpha_bar + (1 - alpha_bar) sigma^2; weighted, that is 1 at every t."""
    from diffusers import DDPMScheduler

    from soragen.train import dit_loss

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                          beta_schedule="squaredcos_cap_v2")

    class Zero(torch.nn.Module):
        def forward(self, x, t, text, mask):
            return torch.zeros_like(x)

    sigma = 0.25
    x0 = torch.randn(512, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * sigma
    text, mask = torch.zeros(512, 1, 2), torch.ones(512, 1, dtype=torch.bool)
    no_ctx = torch.zeros(512, dtype=torch.long)
    for power in (0.2, 5.0):  # mostly clean timesteps, then mostly noisy ones
        args = (Zero(), sched, x0, text, mask, no_ctx, 20, torch.Generator().manual_seed(0), power)
        assert abs(dit_loss(*args, sigma_data=sigma).item() - 1.0) < 0.05
    plain = [dit_loss(Zero(), sched, x0, text, mask, no_ctx, 20, torch.Generator().manual_seed(0), p).item() for p in (0.2, 5.0)]
    assert plain[0] > 3 * plain[1]  # unweighted, clean timesteps dominate


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_frame_noise_gives_a_share_of_windows_a_timestep_per_frame(share):
    """train.dit.frame_noise: that share of windows draws each non-context frame's t on its own."""
    from diffusers import DDPMScheduler

    from soragen.train import dit_loss

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, text, mask):
            seen.append(t)
            return torch.zeros_like(x)

    n = 2000
    x0 = torch.zeros(n, 1, 5, 1, 1)
    text, mask = torch.zeros(n, 1, 2), torch.ones(n, 1, dtype=torch.bool)
    ctx = torch.ones(n, dtype=torch.long)  # frame 0 is context in every window
    dit_loss(Recorder(), sched, x0, text, mask, ctx, 20, torch.Generator().manual_seed(0), frame_noise=share)
    t = seen[0]  # (n, 5)
    assert (t[:, 0] <= 20).all()  # context frames keep their low noise level
    varied = (t[:, 1:] != t[:, 1:2]).any(dim=1).float().mean().item()
    assert abs(varied - share) < 0.03
    assert t[:, 1:].min() >= 0 and t[:, 1:].max() <= 999


def test_self_condition_training_gives_half_the_batches_an_estimate():
    """With self-conditioning, about half the batches make a first pass whose x0 estimate the second pass gets."""
    from diffusers import DDPMScheduler

    from soragen.train import dit_loss

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    fed = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, text, mask, x_self=None):
            fed.append(x_self)
            return torch.ones_like(x)

    x0 = torch.randn(2, 4, 3, 2, 2)
    text, mask = torch.zeros(2, 1, 8), torch.ones(2, 1, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    calls = []
    for _ in range(200):
        before = len(fed)
        dit_loss(Recorder(), sched, x0, text, mask, torch.tensor([0, 0]), 20, g, self_condition=True)
        calls.append(len(fed) - before)
        if calls[-1] == 2:
            assert torch.equal(fed[-2], torch.zeros_like(x0)) and fed[-1].abs().sum() > 0
        else:
            assert torch.equal(fed[-1], torch.zeros_like(x0))
    assert 0.4 < calls.count(2) / len(calls) < 0.6


def test_self_conditioned_model_trains_and_generates(tmp_path):
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "dit.self_condition=true", "sampler.frame_lag=1"])
    model = train(cfg)
    pipe = Pipeline.from_config(load_config(None, [f"model={model}"]))
    assert pipe.dit.cfg.self_condition
    sidecar = pipe.generate("a red circle moving left", tmp_path / "v.mp4")
    assert sidecar["video"]["frames"] == 8


def test_init_model_fine_tunes_and_can_add_self_conditioning(trained, tmp_path):
    """train.dit.init_model: the DiT starts as the given model; a new self-conditioning input starts at zero."""
    from safetensors.torch import load_file

    cfg, root, model = trained
    run = tmp_path / "ft"
    # Same VAE: reuse the trained run's VAE weights and latent cache by copying the run folder's VAE stage.
    ft = train_config(TINY + [f"train.output_dir={run}", f"train.vae_model={model}", "train.dit.steps=0",
                              f"train.dit.init_model={model}", "dit.self_condition=true"])
    out = train(ft)
    assert not RunFolder(run).vae.exists()  # train.vae_model: the VAE stage does not run
    old = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    new = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    half = old["x_embedder.weight"].shape[1]
    torch.testing.assert_close(new["x_embedder.weight"][:, :half], old["x_embedder.weight"])
    assert new["x_embedder.weight"][:, half:].abs().max() == 0
    torch.testing.assert_close(new["proj_out.weight"], old["proj_out.weight"])
    bad = train_config(TINY + [f"train.output_dir={tmp_path / 'bad'}", f"train.vae_model={model}",
                               f"train.dit.init_model={model}", "dit.width=64"])
    with pytest.raises(UserError, match="init_model"):
        train(bad)
    other_text = train_config(TINY + [f"train.output_dir={tmp_path / 'bad2'}", f"train.vae_model={model}",
                                      f"train.dit.init_model={model}", "text_encoder.num_layers=2"])
    with pytest.raises(UserError, match="has another text encoder than this config: a fine-tune keeps its model's, so set "
                                         "text_encoder.num_layers=1 \\(or start from --config .*soragen.yaml\\)"):
        train(other_text)  # the model it would write would record a text encoder it does not have
    assert not (tmp_path / "bad2").exists()


def test_decoder_stage_fine_tunes_only_the_decoder(trained, tmp_path):
    """train.stages [decoder]: the decoder of run/model learns on the DiT's latents; the encoder stays as it was."""
    import shutil

    from safetensors.torch import load_file

    cfg, root, model = trained
    run = tmp_path / "dec"
    shutil.copytree(model, run / "model")
    before = load_file(str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    ft = train_config(TINY + [f"train.output_dir={run}", "train.stages=[decoder]", "train.decoder.steps=3",
                              "train.decoder.batch_size=2", "train.decoder.clip_frames=5",
                              "train.decoder.last_steps=2", "train.decoder.clean_fraction=0"])
    assert train(ft, resume=True) == run / "model"
    after = load_file(str(run / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    info = json.loads((run / "model" / "vae" / "decoder_finetune.json").read_text())
    assert info["steps"] == 3 and "gate" in info
    recorded = read_yaml(run / "model" / "soragen.yaml")  # the folder's config tells this stage's settings
    assert recorded["train"]["decoder"]["steps"] == 3 and recorded["train"]["decoder"]["last_steps"] == 2
    assert recorded["model"] is None and recorded["dit"] == read_yaml(model / "soragen.yaml")["dit"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["stage"] == "decoder" and "loss" in m] == [2, 3]
    assert all(m["sampler_steps"] >= 1 for m in lines if m["stage"] == "decoder" and "loss" in m)
    # The fine-tuned model generates; a rerun with --resume finds the stage done.
    pipe = Pipeline.from_config(load_config(None, [f"model={run / 'model'}"]))
    assert pipe.generate("a red circle moving left", tmp_path / "v.mp4")["video"]["frames"] == 8
    train(ft, resume=True)
    again = load_file(str(run / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_resuming_a_finished_run_keeps_its_decoder_and_more_dit_steps_tune_it_again(tmp_path, caplog):
    """A finished run resumed is not exported again (that would put back the decoder stage 3 replaced); a DiT
    trained on and exported anew makes the decoder's checkpoints stale, and stage 3 starts again."""
    from safetensors.torch import load_file

    decoder = ["train.decoder.steps=2", "train.decoder.batch_size=2", "train.decoder.clip_frames=5",
               "train.decoder.last_steps=2", "train.stages=[vae,dit,decoder]"]
    train(train_config(TINY + [f"train.output_dir={tmp_path}"] + decoder))
    weights = tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors"
    tuned = load_file(str(weights))
    assert train(train_config(TINY + [f"train.output_dir={tmp_path}"]), resume=True) == tmp_path / "model"
    assert (tmp_path / "model" / "vae" / "decoder_finetune.json").is_file()
    assert all(torch.equal(tuned[k], v) for k, v in load_file(str(weights)).items())
    with caplog.at_level("WARNING", logger="soragen.train"):
        train(train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.steps=6"] + decoder), resume=True)
    assert "were tuned on an earlier DiT's latents; stage 3 starts again" in caplog.text
    assert (tmp_path / "model" / "vae" / "decoder_finetune.json").is_file()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["stage"] == "decoder" and "loss" in m] == [2]  # once: the stale line went
    assert [m["step"] for m in lines if m["stage"] == "dit" and "loss" in m] == [2, 4, 6]


def test_a_resume_trains_at_the_settings_learning_rates_and_ema_decay(tmp_path):
    """accelerate restores a scheduler's base rates and diffusers an EMA's decay with their state: a resume with other
    settings uses the settings' (as config.yaml records), and metrics.jsonl holds each step once."""
    run = RunFolder(tmp_path)
    train(train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.stop_after=3"]))
    shutil.rmtree(run.latest("dit"))  # resume from step 2: step 3's line is logged again
    more = ["train.dit.lr=2e-4", "train.dit.text_lr=3e-4", "train.dit.ema_decay=0.99"]
    train(train_config(TINY + [f"train.output_dir={tmp_path}"] + more), resume=True)
    ckpt = run.latest("dit")
    assert json.loads((ckpt / "meta.json").read_text())["ema"]["decay"] == 0.99
    sched = torch.load(ckpt / "state" / "scheduler.bin", weights_only=True)
    assert sched["base_lrs"] == [2e-4, 3e-4]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["stage"] == "dit" and "loss" in m] == [2, 4]


def test_a_carried_checkpoint_resumes_with_its_weights_schedule_and_a_fresh_optimizer(tmp_path, caplog):
    """carry_checkpoint keeps a half-trained stage's weights as float16 and no optimizer; in a fresh run folder (the
    other machine) --resume continues from its step with those weights, the EMA from them, the schedule at its step."""
    from safetensors.torch import load_file

    from soragen.train import carry_checkpoint

    src, dst = RunFolder(tmp_path / "a"), RunFolder(tmp_path / "b")
    more = ["train.dit.steps=6", "train.dit.warmup=4", "train.dit.text_binding=0.5"]  # DiT, T5 and binding probe
    train(train_config(TINY + [f"train.output_dir={src.root}", "train.dit.stop_after=2"] + more))
    ckpt = src.latest("dit")
    carried = carry_checkpoint(ckpt, dst.checkpoints / ckpt.name)
    assert sorted(p.name for p in (carried / "state").iterdir()) == [
        "model.safetensors", "model_1.safetensors", "model_2.safetensors"]
    weights = load_file(str(carried / "state" / "model.safetensors"))
    full = load_file(str(ckpt / "state" / "model.safetensors"))
    assert all(w.dtype == torch.float16 for w in weights.values())
    assert all(torch.allclose(weights[k].float(), full[k], rtol=1e-3, atol=1e-5) for k in full)
    shutil.copytree(src.vocabulary, dst.vocabulary)  # carry_run.sh carries the word ids and settings with it
    shutil.copy(src.root / "config.yaml", dst.root / "config.yaml")
    with caplog.at_level("INFO", logger="soragen"):
        train(train_config(TINY + [f"train.output_dir={dst.root}", "train.dit.stop_after=3"] + more), resume=True)
    assert "from the carried checkpoint" in caplog.text and "optimizer starts afresh" in caplog.text
    after = dst.latest("dit")
    assert after.name == "dit-0000003" and not json.loads((after / "meta.json").read_text()).get("carried")
    sched = torch.load(after / "state" / "scheduler.bin", weights_only=True)
    assert sched["last_epoch"] == torch.load(ckpt / "state" / "scheduler.bin", weights_only=True)["last_epoch"] + 1
    lines = [json.loads(line) for line in (dst.root / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["stage"] == "dit" and "loss" in m] == [3]
    assert json.loads((after / "meta.json").read_text())["ema"]["optimization_step"] == 3
    # one optimizer step from the carried weights (a fresh Adam moves each weight by about the learning rate)
    resumed = load_file(str(after / "state" / "model.safetensors"))
    assert max((resumed[k] - weights[k].float()).abs().max().item() for k in weights) < 2e-3


def test_a_fine_tune_of_another_dit_size_is_refused_before_its_cache(trained, tmp_path):
    _, _, model = trained
    cfg = train_config(TINY + [f"train.output_dir={tmp_path / 'ft'}", "train.stages=[dit]", f"train.vae_model={model}",
                               f"train.dit.init_model={model}", "dit.width=48", "dit.self_condition=true"])
    with pytest.raises(UserError, match=r"trained with other DiT settings than this config's: a fine-tune keeps its "
                                        r"model's, so set dit\.width=32$"):
        train(cfg)
    assert not (tmp_path / "ft").exists()


def test_decoder_stage_needs_a_trained_model(tmp_path):
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.stages=[decoder]"])
    with pytest.raises(UserError, match="runs after the 'dit' stage"):
        train(cfg)


def test_direction_contrast_rewards_a_prediction_that_reads_the_swapped_caption():
    """The contrast rows are drawn at t >= min_timestep; the term falls as the swapped caption's loss rises."""
    from diffusers import DDPMScheduler

    from soragen.train import SwappedCaptions, dit_loss, swapped_rows

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    rows, texts = swapped_rows(["a red ball moving up", "", "a red ball bouncing", "a blue box moving left"],
                               np.array([0, 0, 0, 0]), limit=4)
    assert rows == [0, 3] and texts == ["a red ball moving down", "a blue box moving right"]
    assert swapped_rows(["a red ball moving up"], np.array([2]), limit=4) == ([], [])  # context: no contrast

    class Reader(torch.nn.Module):
        """Predicts 0 for the true caption (text 0) and `off` for the swapped one (text 1)."""

        def __init__(self, off):
            super().__init__()
            self.off, self.timesteps = off, None

        def forward(self, x, t, text, mask):
            self.timesteps = t
            return text[:, 0, 0].view(-1, 1, 1, 1, 1) * self.off * torch.ones_like(x)

    x0 = torch.randn(4, 4, 3, 2, 2)
    text, mask = torch.zeros(4, 1, 8), torch.ones(4, 1, dtype=torch.bool)
    swapped = SwappedCaptions(torch.tensor(rows), torch.ones(2, 1, 8), torch.ones(2, 1, dtype=torch.bool),
                              torch.tensor([[700, 1000], [700, 1000]]))
    terms = []
    for off in (0.0, 3.0):
        reader = Reader(off)
        loss, contrast, gap = dit_loss(reader, sched, x0, text, mask, torch.zeros(4, dtype=torch.long), 20,
                                       torch.Generator().manual_seed(0), swapped=swapped)
        assert reader.timesteps.shape[0] == 6 and (reader.timesteps[[0, 3, 4, 5]] >= 700).all()
        terms.append((loss.item(), contrast.mean().item(), gap.mean().item()))
    assert terms[0][0] == terms[1][0]  # the main loss sees only the true captions
    assert abs(terms[0][1] - math.log(2)) < 1e-5 and abs(terms[0][2]) < 1e-5  # a prediction blind to the word
    assert terms[1][1] < 0.01 and terms[1][2] > 1  # one that reads it


def test_direction_contrast_trains(tmp_path):
    """A run with the contrast on logs it (context and caption dropout off, so every batch has rows)."""
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.direction_contrast=0.5",
                               "dit.self_condition=true", "train.dit.context_fraction=0",
                               "train.dit.caption_dropout=0", "data.long_fraction=0"])
    train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["stage"] == "dit" and "loss" in r]
    assert len(steps) == 2 and all({"contrast", "swap_gap", "v_loss"} <= set(r) for r in steps)


def test_contrasts_start_at_contrast_from(tmp_path):
    """train.dit.contrast_from=2: steps 1-2 (logged at 2) train without the contrast, steps 3-4 with it."""
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.direction_contrast=0.5",
                               "train.dit.contrast_from=2", "train.dit.context_fraction=0",
                               "train.dit.caption_dropout=0", "data.long_fraction=0"])
    train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["stage"] == "dit" and "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert "contrast" not in steps[0] and {"contrast", "swap_gap"} <= set(steps[1])


def test_contrast_from_past_the_last_step_warns(tmp_path, caplog):
    """A run whose contrasts would start after its last step says so (e.g. a short fine-tune on the recipe)."""
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.direction_contrast=0.5",
                               "train.dit.contrast_from=100"])
    with caplog.at_level("WARNING", logger="soragen"):
        train(cfg)
    assert "contrasts never start" in caplog.text and "contrast_from=0" in caplog.text


def test_contrast_batch_gives_direction_and_shape_rows_their_own_windows_and_timesteps():
    """Direction rows first (t >= direction_contrast_min_t), then other rows for the shape contrast (t in its span)."""
    from soragen.train import contrast_batch

    class Encoder:
        def __call__(self, texts):
            return torch.zeros(len(texts), 2, 8), torch.ones(len(texts), 2, dtype=torch.bool)

    cfg = train_config(TINY + ["train.dit.direction_contrast=0.1", "train.dit.shape_contrast=0.2",
                               "train.dit.direction_contrast_rows=1", "train.dit.shape_contrast_rows=2",
                               "train.dit.shape_contrast_t=[40,300]"])
    prompts = ["a red ball moving up", "a blue box moving left", "", "a green triangle bouncing", "a red ball moving up"]
    swapped, groups = contrast_batch(Encoder(), prompts, np.array([0, 0, 0, 0, 3]), cfg.train.dit, 1000)
    assert groups == [("direction", 0.1, 1), ("shape", 0.2, 2)]
    assert swapped.rows.tolist() == [0, 1, 3]  # row 4 has context, row 2 no caption
    assert swapped.timesteps.tolist() == [[500, 1000], [40, 300], [40, 300]]
    off, _ = contrast_batch(Encoder(), prompts, np.zeros(5, dtype=int), train_config(TINY).train.dit, 1000)
    assert off is None


def test_shape_contrast_trains(tmp_path):
    """A run with both contrasts logs each of them."""
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.direction_contrast=0.5",
                               "train.dit.direction_contrast_rows=1", "train.dit.shape_contrast=0.5",
                               "train.dit.context_fraction=0",
                               "train.dit.caption_dropout=0", "data.long_fraction=0"])
    train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["stage"] == "dit" and "loss" in r]
    assert steps and all({"shape_contrast", "shape_swap_gap"} <= set(r) for r in steps)


def test_shape_weight_weighs_each_latent_pixel():
    """A weight of 1 everywhere is the plain loss; a weight on some pixels counts their squared error that much more."""
    from diffusers import DDPMScheduler

    from soragen.train import dit_loss

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")

    class Zero(torch.nn.Module):
        def forward(self, x, t, text, mask):
            return torch.zeros_like(x)

    x0 = torch.randn(3, 4, 2, 2, 2)
    text, mask = torch.zeros(3, 1, 8), torch.ones(3, 1, dtype=torch.bool)
    no_ctx = torch.zeros(3, dtype=torch.long)

    def loss(weight):
        return dit_loss(Zero(), sched, x0, text, mask, no_ctx, 20, torch.Generator().manual_seed(0), weight=weight)

    plain = loss(None)
    assert torch.allclose(loss(torch.ones(3, 2, 2, 2)), plain)
    assert torch.allclose(loss(torch.full((3, 2, 2, 2), 3.0)), 3 * plain)
    one = torch.ones(3, 2, 2, 2)
    one[:, :, 0, 0] = 5.0
    assert loss(one) > plain


def test_shape_weight_trains_on_the_cues_of_the_cached_clips(tmp_path):
    """The cues are the cached clips' (same draws), on the latent grid, written once and read back."""
    from safetensors.torch import load_file

    from soragen.data.clips import ShapesSource
    from soragen.train import RunFolder, build_shape_cues
    from soragen.vae import frames_for

    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.shape_weight=5", "train.dit.steps=2"])
    train(cfg)
    run = RunFolder(tmp_path)
    latents = load_file(str(run.latents))["latents"]  # (N, C, K, h, w)
    cues = load_file(str(run.shape_cues))["cues"]  # (N, K, h, w)
    assert cues.shape == latents[:, 0].shape and 0 <= cues.min() and cues.max() <= 1 and cues.amax(dim=(1, 2, 3)).gt(0).all()
    captions = json.loads(run.latents.with_suffix(".json").read_text())["captions"]
    rng = np.random.default_rng([cfg.seed, 1234])
    replay = [ShapesSource(cfg.data).sample(rng, frames_for(cfg.data.clip_latent_frames, 2)) for _ in captions]
    assert [list(c.captions) for c in replay] == captions
    # the object moves, and its cue with it: the cue's column of mass follows the frames' (first clip, first and last latent frame)
    frames = torch.from_numpy(replay[0].frames).float().sum(dim=-1)  # (T, H, W)
    s = cfg.vae.spatial_compression
    for k, f in ((0, 0), (-1, -1)):
        lit = torch.nn.functional.avg_pool2d(frames[f][None], s)[0] > 0  # (h, w)
        assert (cues[0, k].float() * lit).sum() > 0.5 * cues[0, k].float().sum()
    stamp = run.shape_cues.stat().st_mtime_ns
    assert torch.equal(build_shape_cues(cfg, run, None), cues) and run.shape_cues.stat().st_mtime_ns == stamp


def test_shape_weight_needs_shapes_data(tmp_path):
    from soragen.train import RunFolder, build_shape_cues

    cfg = train_config(TINY + ["data.kind=manifest", f"data.path={tmp_path}"])
    with pytest.raises(UserError, match="data.kind: shapes"):
        build_shape_cues(cfg, RunFolder(tmp_path), None)


def test_twin_rows_are_noised_from_the_twin_and_predict_their_own_latents():
    """A twin row's input is noised from x0 + s (x0_twin - x0), one s in [0, 1] per row, at one timestep in its
    span; its target is the v whose x0 estimate is the row's own x0, not what its input was noised from."""
    from diffusers import DDPMScheduler

    from soragen.train import TwinInputs, dit_loss

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0 = torch.randn(4, 4, 3, 2, 2, dtype=torch.float64)
    text, mask = torch.zeros(4, 1, 8), torch.ones(4, 1, dtype=torch.bool)
    twin = TwinInputs(torch.tensor([1, 3]), x0[[1, 3]] + 1000.0, (40, 300))  # twins far away: s reads off x_t

    class Oracle(torch.nn.Module):
        """Predicts the v whose x0 estimate is `target`."""

        def __init__(self, target):
            super().__init__()
            self.target, self.seen = target, None

        def forward(self, x, t, text, mask):
            self.seen = (x, t)
            a = sched.alphas_cumprod[t].to(x)[:, None, :, None, None]  # (B, 1, T, 1, 1)
            return (a.sqrt() * x - self.target) / (1 - a).sqrt()

    def loss(target):
        oracle = Oracle(target)
        value = dit_loss(oracle, sched, x0, text, mask, torch.zeros(4, dtype=torch.long), 20,
                         torch.Generator().manual_seed(0), twin=twin)
        return value, oracle.seen

    exact, (x_t, t) = loss(x0)
    assert exact < 1e-12
    assert ((t[[1, 3]] >= 40) & (t[[1, 3]] < 300)).all() and (t[[1, 3]] == t[[1, 3], :1]).all()
    a = sched.alphas_cumprod[t].to(x0)[:, None, :, None, None]
    noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()  # the noise, had each row been noised from x0
    assert noise[[0, 2]].abs().max() < 10 and noise[[1, 3]].abs().max() > 100  # plain rows were; twin rows were not
    share = (x_t - a.sqrt() * x0) / (a.sqrt() * 1000.0)  # twin rows: s + noise / (1000 sqrt(a))
    s = share[[1, 3]].flatten(1).mean(dim=1)  # (2,)
    assert ((s > 0) & (s < 1)).all() and share[[1, 3]].flatten(1).std(dim=1).max() < 0.01
    moved = x0 + s.new_zeros(4).index_copy(0, torch.tensor([1, 3]), s).view(4, 1, 1, 1, 1) * 1000.0
    blind, _ = loss(moved)  # a model that denoises the input it was given
    assert blind > 1.0


def test_twin_inputs_take_rows_without_context_with_a_caption_and_not_taken():
    from soragen.train import twin_inputs

    twins = torch.arange(5 * 1 * 6 * 1 * 1, dtype=torch.float32).view(5, 1, 6, 1, 1)
    prompts = ["a red ball moving up", "", "a blue box", "a green triangle", "a red ball moving up"]
    got = twin_inputs(twins, np.array([4, 3, 2, 1, 0]), np.array([0, 1, 2, 3, 1]), 3, prompts,
                      np.array([0, 0, 0, 0, 2]), limit=2, span=(30, 300), skip=[0])
    assert got.rows.tolist() == [2, 3] and got.span == (30, 300)  # 1 has no caption, 0 is taken, 4 has context
    assert torch.equal(got.x0, torch.stack([twins[2, :, 2:5], twins[1, :, 3:6]]))
    assert twin_inputs(twins, np.zeros(5, dtype=int), np.zeros(5, dtype=int), 3, prompts, np.ones(5, dtype=int), 2,
                       (30, 300)) is None


def test_twin_rows_train_on_the_cached_clips_twins(tmp_path):
    """The twin cache is the cached clips' shape twins (same draws), encoded once and read back."""
    from safetensors.torch import load_file

    from soragen.data.clips import ShapesSource
    from soragen.train import _clips_to_tensor, build_twin_latents, load_trained_vae
    from soragen.vae import frames_for

    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.twin_rows=2", "train.dit.steps=2",
                               "train.dit.context_fraction=0", "data.long_fraction=0"])
    train(cfg)
    run = RunFolder(tmp_path)
    latents, twins = load_file(str(run.latents))["latents"], load_file(str(run.twin_latents))["latents"]
    assert twins.shape == latents.shape and not torch.equal(twins, latents)
    captions = json.loads(run.latents.with_suffix(".json").read_text())["captions"]
    rng = np.random.default_rng([cfg.seed, 1234])
    num_frames = frames_for(cfg.data.clip_latent_frames, cfg.vae.temporal_compression)
    replay = [ShapesSource(cfg.data).sample(rng, num_frames, twin=True) for _ in captions]
    assert [list(c.captions) for c in replay] == captions
    assert all(c.twin.shape == c.frames.shape for c in replay) and any((c.twin != c.frames).any() for c in replay)
    vae = load_trained_vae(cfg, run)
    with torch.no_grad():
        encoded = vae.encode(_clips_to_tensor([c.twin for c in replay]))[0].half()
    assert torch.equal(encoded, twins)
    lines = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["twin_rows"] for r in lines if r["stage"] == "dit" and "loss" in r] == [2]  # batch 4, no context, 2 rows
    stamp = run.twin_latents.stat().st_mtime_ns
    assert torch.equal(build_twin_latents(cfg, run, vae, None), twins)
    assert run.twin_latents.stat().st_mtime_ns == stamp


def test_twin_rows_need_shapes_data(tmp_path):
    from soragen.train import build_twin_latents

    cfg = train_config(TINY + ["data.kind=manifest", f"data.path={tmp_path}"])
    with pytest.raises(UserError, match="twin_rows needs data.kind: shapes"):
        build_twin_latents(cfg, RunFolder(tmp_path), None, None)


def test_twin_batch_holds_scenes_then_their_twins_then_their_backgrounds():
    """Each twin is the same scene at the same times with its shapes swapped; the batch is ordered as separation_loss reads it."""
    from soragen.data import shapes
    from soragen.data.clips import ShapesSource
    from soragen.train import _clips_to_tensor, twin_batch

    cfg = train_config(TINY + ["data.long_fraction=0.5"])
    source = ShapesSource(cfg.data)
    x = twin_batch(source, np.random.default_rng(3), 4, 5)  # (12, 3, 5, 64, 64)
    replay = np.random.default_rng(3)
    expected = [[], [], []]
    for _ in range(4):
        scene, start = source._scene(replay)
        for part, s in enumerate((scene, shapes.shape_twin(scene), shapes.Scene((), scene.wall))):
            expected[part].append(shapes.render(s, 5, start_time=start))
    assert torch.equal(x, _clips_to_tensor(expected[0] + expected[1] + expected[2]))
    assert not torch.equal(x[:4], x[4:8])  # the twins differ from their scenes


def test_separation_loss_is_the_shortfall_of_shape_distance_over_object_energy():
    from soragen.train import separation_loss

    background = torch.zeros(2, 1, 1, 2, 2)
    clip = torch.zeros(2, 1, 1, 2, 2)
    clip[:, 0, 0, 0, 0] = 2.0  # energy 4 against the background
    twin = clip.clone()
    twin[0, 0, 0, 0, 1] = 1.0  # row 0: shape distance 1, ratio 0.25; row 1: its own twin, left out
    loss, metrics = separation_loss(torch.cat([clip, twin, background]), target=0.5)
    assert abs(loss.item() - 0.25) < 1e-6 and abs(metrics["separation"] - 0.25) < 1e-6
    assert separation_loss(torch.cat([clip, twin, background]), target=0.2)[0].item() == 0.0
    loss, metrics = separation_loss(torch.cat([clip, clip, background]), target=0.5)
    assert loss.item() == 0.0 and metrics == {}


def test_separation_loss_moves_shapes_apart_not_objects_towards_the_background():
    from soragen.train import separation_loss

    clip = torch.zeros(1, 1, 1, 2, 2)
    clip[0, 0, 0, 0, 0] = 2.0
    twin = clip.clone()
    twin[0, 0, 0, 0, 1] = 1.0
    background = torch.zeros(1, 1, 1, 2, 2, requires_grad=True)
    twin.requires_grad_(True)
    separation_loss(torch.cat([clip, twin, background]), target=0.5)[0].backward()
    assert background.grad.abs().sum() == 0  # the energy only scales the ratio
    assert twin.grad[0, 0, 0, 0, 1] < 0  # the twin's differing corner is pushed further out


def test_shape_separation_trains_the_vae(tmp_path):
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.stages=[vae]", "train.vae.shape_separation=1",
                               "train.vae.batch_size=3"])
    train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("separation" in r for r in lines if r["stage"] == "vae")
    with pytest.raises(UserError, match="multiple of 3"):
        train_config(TINY + ["train.vae.shape_separation=1", "train.vae.batch_size=4"])


@pytest.mark.parametrize("kind", ["model folder", "run folder"])
def test_vae_init_model_starts_from_a_finished_vae(trained, tmp_path, kind):
    """With a learning rate of 0 the fine-tuned VAE is the given one, weight for weight: a model folder's VAE, or
    another run's finished VAE stage (scripts/train_default.sh's phases)."""
    from safetensors.torch import load_file

    folder = trained[2] if kind == "model folder" else trained[1]
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.stages=[vae]", "train.vae.lr=0",
                               f"train.vae.init_model={folder}", "train.vae.steps=1"])
    train(cfg)
    name = "vae/diffusion_pytorch_model.safetensors"
    source, tuned = load_file(str(folder / name)), load_file(str(tmp_path / name))
    assert source.keys() == tuned.keys() and all(torch.equal(source[k].float(), tuned[k].float()) for k in source)


def test_vae_init_model_needs_a_finished_vae_stage(trained, tmp_path):
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text((trained[1] / "config.yaml").read_text())
    cfg = train_config(TINY + [f"train.output_dir={tmp_path / 'next'}", "train.stages=[vae]",
                               f"train.vae.init_model={tmp_path / 'unfinished'}"])
    with pytest.raises(UserError, match="no finished VAE stage"):
        train(cfg)


def test_shape_options_are_off_with_a_warning_for_other_data(tmp_path, caplog):
    """configs/default.yaml on a user's own dataset: the Shapes World's options step aside and say so."""
    from soragen.data.clips import write_shapes_dataset

    write_shapes_dataset(tmp_path / "data", num=4, seconds=1.0, seed=0)
    cfg = train_config(TINY + [f"train.output_dir={tmp_path / 'run'}", "train.vae.shape_separation=1",
                               "train.vae.batch_size=3", "train.dit.shape_weight=5", "train.dit.twin_rows=2",
                               "train.dit.text_binding=0.5", "data.kind=manifest", f"data.path={tmp_path / 'data'}",
                               "data.two_object_fraction=0.8"])
    with caplog.at_level("WARNING", logger="soragen"):
        train(cfg)
    assert all(f"{option} is off" in caplog.text for option in ("train.vae.shape_separation", "train.dit.shape_weight",
                                                                "train.dit.twin_rows", "train.dit.text_binding"))
    assert caplog.text.count("data.two_object_fraction (0.8) set but not used") == 1  # once, for both stages
    run = RunFolder(tmp_path / "run")
    assert run.model.is_dir() and not run.shape_cues.exists() and not run.twin_latents.exists()
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert all(f"{key}: 0" in recorded for key in ("shape_separation", "shape_weight", "twin_rows", "text_binding"))  # what the run did


def test_a_phase_on_another_runs_vae_reuses_its_copied_latent_cache(trained, tmp_path):
    """scripts/train_default.sh's DiT phases: train.vae_model names the model folder of the phase before, whose
    latent cache is copied in; the same encoder weights, read from another path, make the same cache."""
    _, root, model = trained
    for name in ("latents.safetensors", "latents.json"):
        shutil.copy2(root / name, tmp_path / name)
    stamp = (tmp_path / "latents.safetensors").stat().st_mtime_ns
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.stages=[dit]", f"train.vae_model={model}",
                               f"train.dit.init_model={model}", "train.dit.steps=1"])
    train(cfg, resume=True)
    assert (tmp_path / "latents.safetensors").stat().st_mtime_ns == stamp  # read, not encoded again
    assert (tmp_path / "model" / "soragen.yaml").is_file()


def test_latent_cache_is_rebuilt_when_the_runs_vae_is_retrained(tmp_path):
    """The latent cache is kept while the VAE encoder's weights stay the same and rebuilt when they change."""
    from safetensors.torch import load_file

    from soragen.model_io import WEIGHTS, save_file_atomic
    from soragen.train import build_latent_cache, load_trained_vae

    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.stages=[vae]", "train.vae_gate_clips=0"])
    train(cfg)
    run = RunFolder(tmp_path)
    first = build_latent_cache(cfg, run, load_trained_vae(cfg, run), None)["latents"]
    stamp = run.latents.stat().st_mtime_ns
    build_latent_cache(cfg, run, load_trained_vae(cfg, run), None)
    assert run.latents.stat().st_mtime_ns == stamp  # same weights: reused
    weights = load_file(str(run.vae / WEIGHTS))
    save_file_atomic({k: v + 0.05 if k.startswith("decoder.") else v for k, v in weights.items()}, run.vae / WEIGHTS)
    build_latent_cache(cfg, run, load_trained_vae(cfg, run), None)
    assert run.latents.stat().st_mtime_ns == stamp  # a new decoder (the decoder stage) leaves the latents as they are
    save_file_atomic({k: v + 0.05 for k, v in weights.items()}, run.vae / WEIGHTS)  # as if the VAE stage ran again
    second = build_latent_cache(cfg, run, load_trained_vae(cfg, run), None)["latents"]
    assert not torch.equal(first, second)
    assert torch.equal(second, load_file(str(run.latents))["latents"])


def test_two_object_fraction_makes_its_own_latent_cache(tmp_path):
    """A cache built with the world's 50/50 draw is not read for another share of two-object scenes."""
    from soragen.train import _cache_digest

    base = train_config(TINY)
    assert _cache_digest(base) == _cache_digest(train_config(TINY + ["data.two_object_fraction=0.5"]))
    assert _cache_digest(base) != _cache_digest(train_config(TINY + ["data.two_object_fraction=0.8"]))
    with pytest.raises(UserError, match="two_object_fraction"):
        train_config(TINY + ["data.two_object_fraction=1.5"])


def test_binding_probe_labels_each_token_with_its_objects_attributes():
    from soragen.data import shapes
    from soragen.text_encoder import word_tokenizer
    from soragen.train import BindingProbe

    tokenizer, probe = word_tokenizer(shapes.vocabulary_corpus(50)), BindingProbe(8)
    prompts = ["a small blue box bouncing and a yellow triangle moving to the left behind a gray wall", "",
               "一个红色的大圆向右移动"]
    labels = probe.labels(tokenizer, prompts, 24)
    words = tokenizer.convert_ids_to_tokens(tokenizer(prompts[0])["input_ids"])
    named = {w: tuple(probe.names[k][int(c)] if c >= 0 else None for k, c in enumerate(row))
             for w, row in zip(words, labels[0]) if w not in ("a",)}
    assert named["box"] == named["small"] == named["bouncing"] == ("blue", "square", "small", "bouncing", 2)
    assert named["triangle"] == named["left"] == ("yellow", "triangle", None, "left", 2)
    assert named["and"] == named["wall"] == named["</s>"] == (None,) * 5  # words of no object
    assert (labels[1] == -100).all()
    assert (labels[2, :11] == torch.tensor([0, 0, 1, 1, 0])).all() and (labels[2, 11:] == -100).all()  # 11 characters


def test_binding_probe_keeps_a_gradient_when_no_caption_names_an_object():
    """Every caption of a batch dropped: the loss is zero, but the probe is still in the graph (a
    multi-process run reduces a gradient for every parameter on every step)."""
    from soragen.train import BindingProbe

    probe = BindingProbe(8)
    loss, accuracy = probe(torch.randn(2, 5, 8), torch.full((2, 5, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and accuracy == 0.0
    assert all(p.grad is not None and (p.grad == 0).all() for p in probe.parameters())


def test_text_binding_trains_a_probe_that_is_checkpointed_not_shipped(tmp_path):
    """train.dit.text_binding: its metrics are logged, its probe is in the checkpoints (a resume reads it
    back) and not in the model folder."""
    from safetensors.torch import load_file

    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.text_binding=0.5", "train.dit.stop_after=2"])
    train(cfg)
    state = RunFolder(tmp_path).latest("dit") / "state"
    assert set(load_file(str(state / "model_2.safetensors"))) == {"proj.weight", "proj.bias"}
    more = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.text_binding=0.5"])
    assert train(more, resume=True) == tmp_path / "model"
    lines = [json.loads(line) for line in RunFolder(tmp_path).metrics.read_text().splitlines()]
    assert all(0 <= r["binding_acc"] <= 1 and r["binding"] > 0 for r in lines if r["stage"] == "dit" and "loss" in r)
    shipped = [k for f in (tmp_path / "model").rglob("*.safetensors") for k in load_file(str(f))]
    assert shipped and "proj.weight" not in shipped  # the probe's own name; the DiT's layers are prefixed


def test_text_binding_needs_a_trainable_text_encoder(tmp_path):
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.text_binding=0.5",
                               "text_encoder.trainable=false"])
    with pytest.raises(UserError, match="text_binding trains the small T5"):
        train(cfg)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before anything was written


def test_long_training_captions_reported_once(tmp_path, caplog):
    """Captions longer than text_encoder.max_length: one warning for the run, not one per caption per batch."""
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "text_encoder.max_length=6", "train.stages=[vae,dit]"])
    with caplog.at_level("WARNING", logger="soragen"):
        train(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("training captions are longer than text_encoder.max_length 6" in m for m in messages) == 1
    assert not any(m.startswith("prompt truncated") for m in messages), [m for m in messages if m.startswith("prompt")]


def test_model_folder_and_cache_follow_the_umask(trained):
    """Model folders and the latent cache are shared between users: not left at mkstemp's or safetensors' 0600."""
    import os
    import stat

    _, root, model = trained
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [root / "latents.safetensors", model, *model.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_a_manifest_of_videos_shorter_than_the_clips_warns(tmp_path, caplog):
    """Videos shorter than the clips a stage cuts are filled by holding their last frame: training says so."""
    from soragen.train import warn_short_clips
    from soragen.vae import frames_for

    cfg = train_config(TINY + ["data.kind=manifest", f"data.path={tmp_path}", "data.clip_latent_frames=20",
                               "vae.temporal_compression=2", "train.stages=[vae,dit]"])
    need = frames_for(20, 2)  # 39 frames: the DiT's cached clips are the longest the run cuts
    records = [{"path": f"{i}.mp4", "caption": "a red circle moving left", "fps": 8, "frames": n}
               for i, n in enumerate([32, need, 40, 30.0])]  # 30.0: a float count from another tool counts too
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level("WARNING", logger="soragen"):
        warn_short_clips(cfg)
    assert "2 of the manifest's 4 videos have fewer than the 39 frames" in caplog.text
    assert "data.clip_latent_frames" in caplog.text and "--seconds 5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="soragen"):
        warn_short_clips(cfg.model_copy(update={"train": cfg.train.model_copy(update={"stages": ["vae"]})}))
    assert not caplog.text  # the VAE's 5-frame clips fit every video


def test_a_folder_of_someone_elses_files_is_not_a_run(tmp_path):
    """Without a run's config.yaml, a folder holding other files is refused, --resume or not (the run's export
    would replace them); a model folder copied in as `model` and latent caches are what a fine-tune starts from."""
    (tmp_path / "u" / "model").mkdir(parents=True)
    (tmp_path / "u" / "model" / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(UserError, match=r"holds model/, which no soragen run wrote"):
            train(train_config(TINY + [f"train.output_dir={tmp_path / 'u'}"]), resume=resume)
    assert (tmp_path / "u" / "model" / "notes.txt").read_text() == "mine"
    (tmp_path / "f" / "model").mkdir(parents=True)
    (tmp_path / "f" / "model" / "soragen.yaml").write_text("seed: 0\n")
    (tmp_path / "f" / "model" / "model_index.json").write_text("{}\n")
    (tmp_path / "f" / "latents.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="inside the model folder"):  # a run inside a model folder
        train(train_config(TINY + [f"train.output_dir={tmp_path / 'f' / 'model' / 'ft'}"]), resume=True)
    from soragen.train import _not_a_run

    assert _not_a_run(RunFolder(tmp_path / "f")) is None  # a fine-tune's set-up is not refused


@pytest.mark.parametrize("settings, fragment", [
    (["train.dit.init_model=/nonexistent/m"], "model folder not found: /nonexistent/m"),
    (["train.vae.init_model=/nonexistent/m"], "model folder not found: /nonexistent/m"),
    (["train.vae_model=/nonexistent/m"], "model folder not found: /nonexistent/m"),
    (["train.dit.window=5"], "train.dit.window 5 is longer than data.clip_latent_frames 4"),
    (["train.dit.max_context=3"], "train.dit.max_context 3 leaves windows of train.dit.window 3 latent frames with no "
                                  "frame to learn from; set it below the window"),
    (["train.stages=[vae,dit,decoder]", "train.decoder.last_steps=30"],
     "last_steps 30 is more than sampler.steps 20; lower train.decoder.last_steps or raise sampler.steps"),
])
def test_settings_a_later_stage_refuses_are_refused_before_the_first(tmp_path, settings, fragment):
    """A missing folder a stage starts from, or windows that do not fit the clips, fail before the VAE stage's hour."""
    run = tmp_path / "run"
    cfg = train_config(TINY + [f"train.output_dir={run}", "sampler.steps=20"] + settings)
    with pytest.raises(UserError, match=re.escape(fragment)):
        train(cfg)
    assert not run.exists()


def test_a_manifest_latent_cache_follows_the_dataset(tmp_path):
    """A dataset edited in place (a caption, a re-encoded video) makes its latent cache stale; the same one does not."""
    import os

    from soragen.train import _dataset_digest

    video = tmp_path / "a.mp4"
    video.write_bytes(b"x" * 10)
    cfg = train_config(TINY + ["data.kind=manifest", f"data.path={tmp_path}"])

    def digest(caption: str) -> str:
        (tmp_path / "manifest.jsonl").write_text(json.dumps({"path": "a.mp4", "caption": caption, "fps": 8}) + "\n")
        return _dataset_digest(cfg)

    first = digest("a red ball")
    assert digest("a red ball") == first
    assert digest("a blue ball") != first
    digest("a red ball")
    stat = video.stat()
    video.write_bytes(b"y" * 10)  # re-encoded, same size
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert _dataset_digest(cfg) != first
    assert _dataset_digest(train_config(TINY)) is None  # the Shapes World: its seed and settings are the config's



def test_a_resumed_run_keeps_its_word_ids(tmp_path):
    """The word vocabulary is saved in the run folder: a run resumed after its dataset's captions changed (a new
    word; the latent cache is rebuilt) keeps the ids its checkpoints were trained with, the new word unknown."""
    from transformers import AutoTokenizer

    from soragen.data.clips import write_shapes_dataset

    manifest = write_shapes_dataset(tmp_path / "data", num=4, seconds=1.0, seed=0)
    data, run = manifest.parent, tmp_path / "run"
    settings = TINY + ["data.kind=manifest", f"data.path={data}", f"train.output_dir={run}"]
    train(train_config(settings + ["train.dit.stop_after=2"]))
    vocab = AutoTokenizer.from_pretrained(str(run / "tokenizer")).get_vocab()
    assert "purple" not in vocab
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(r | {"caption": "a purple " + r["caption"]}) + "\n" for r in records))
    out = train(train_config(settings), resume=True)
    assert AutoTokenizer.from_pretrained(str(out / "tokenizer")).get_vocab() == vocab


def test_a_run_loads_all_of_its_code_when_it_starts():
    """A later stage must not import a module edited since the run began (an editable install): all of soragen
    is imported by the time training starts."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from soragen.config import load_config\n"
             "from soragen.errors import UserError\n"
             "from soragen.train import train\n"
             "try:\n"
             "    train(load_config(None, ['train.dit.window=99'], builtin_default=False))\n"  # refused before any stage
             "except UserError:\n"
             "    print(sorted(m for m in sys.modules if m.startswith('soragen')))\n")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    for name in ("soragen.pipeline", "soragen.text_encoder", "soragen.dit", "soragen.sampler", "soragen.gallery",
                 "soragen.evaluation.detector", "soragen.evaluation.run", "soragen.data.shapes", "soragen.batch"):
        assert f"'{name}'" in loaded
    assert "soragen.__main__" not in loaded


def test_checks_before_the_stages_follow_what_the_run_will_do(trained, tmp_path):
    """A resumed run whose VAE is trained does not need train.vae.init_model any more; an incomplete init model
    is named with what it lacks; train.vae_model may be a run folder (its model's VAE)."""
    import shutil

    from soragen.train import check_before_stages

    cfg, root, model = trained
    run = RunFolder(root)
    gone = train_config(TINY + [f"train.output_dir={root}", "train.vae.init_model=/nonexistent/m"])
    check_before_stages(gone, run, resume=True)  # stage 1 is skipped: the folder it started from is not needed
    with pytest.raises(UserError, match="model folder not found: /nonexistent/m"):
        check_before_stages(gone, run, resume=False)
    partial = tmp_path / "partial"
    shutil.copytree(model, partial)
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(UserError, match="train.dit.init_model .*partial is incomplete: tokenizer missing; give a model folder"):
        check_before_stages(train_config(TINY + [f"train.dit.init_model={partial}"]), RunFolder(tmp_path / "r"), False)
    check_before_stages(train_config(TINY + [f"train.vae_model={root}", "train.stages=[dit]"]), RunFolder(tmp_path / "r"),
                        False)
    from soragen.train import vae_weights

    assert vae_weights(train_config(TINY + [f"train.vae_model={root}"]), RunFolder(tmp_path / "r")) == (
        model / "vae" / "diffusion_pytorch_model.safetensors")


def test_a_run_records_its_folders_whole_and_resumes_from_its_config_anywhere(tmp_path, monkeypatch, capsys, caplog):
    """config.yaml gives the folders a run was given by relative paths as absolute ones ('builtin' stays a
    name): `soragen train --config RUN/config.yaml --resume` from another directory continues the same run, and
    keeps its manifest's latent cache (its key follows the dataset, not how its folder was written)."""
    from conftest import run_cli

    from soragen.config import build_config
    from soragen.data.clips import write_shapes_dataset
    from soragen.train import recorded_config

    work = tmp_path / "work"
    write_shapes_dataset(work / "data", num=4, seconds=1.0, seed=0)
    monkeypatch.chdir(work)
    cfg = train_config(TINY + ["data.kind=manifest", "data.path=data", "train.output_dir=runs/a",
                               "train.dit.stop_after=2"])
    train(cfg)
    recorded = read_yaml(work / "runs" / "a" / "config.yaml")
    assert recorded["train"]["output_dir"] == str(work / "runs" / "a") and recorded["data"]["path"] == str(work / "data")
    (work / "builtin").mkdir()  # a folder named like the built-in model does not make 'builtin' a path
    assert recorded_config(build_config({**cfg.to_dict(), "model": "builtin"})).model == "builtin"
    cache = (work / "runs" / "a" / "latents.safetensors").stat().st_mtime_ns
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(["train", "--config", str(work / "runs" / "a" / "config.yaml"), "--resume",
                            "--set", "train.dit.stop_after=null"], capsys)
    assert code == 0, err
    assert (work / "runs" / "a" / "model" / "soragen.yaml").is_file() and not (elsewhere / "runs").exists()
    assert (work / "runs" / "a" / "latents.safetensors").stat().st_mtime_ns == cache and "rebuilding" not in caplog.text


def test_a_manifest_cache_keyed_as_before_stays_valid(tmp_path, caplog):
    """A manifest run's latent cache written before its key left out the dataset's folder (and before caches
    recorded their dataset) is reused by the same run, not encoded again."""
    from soragen.data.clips import write_shapes_dataset
    from soragen.train import _cache_digest, vae_weights

    write_shapes_dataset(tmp_path / "data", num=4, seconds=1.0, seed=0)
    run = tmp_path / "run"
    settings = TINY + ["data.kind=manifest", f"data.path={tmp_path / 'data'}", f"train.output_dir={run}"]
    cfg = train_config(settings + ["train.dit.stop_after=2"])
    train(cfg)
    meta = json.loads((run / "latents.json").read_text())
    assert meta["config_digest"] != _cache_digest(cfg, vae_weights(cfg, RunFolder(run)), with_path=True)
    meta["config_digest"] = _cache_digest(cfg, vae_weights(cfg, RunFolder(run)), with_path=True)
    del meta["dataset"]
    (run / "latents.json").write_text(json.dumps(meta))
    cache = (run / "latents.safetensors").stat().st_mtime_ns
    train(train_config(settings), resume=True)
    assert (run / "latents.safetensors").stat().st_mtime_ns == cache and "rebuilding" not in caplog.text


def test_a_resume_logs_each_step_and_the_vae_gate_once(tmp_path):
    """forget_metrics drops what a resume from step `after` logs again: later steps, and the gate at `after`."""
    run = RunFolder(tmp_path)
    lines = [{"stage": "vae", "step": 90, "loss": 1.0}, {"stage": "vae", "step": 100, "loss": 0.9},
             {"stage": "vae", "step": 100, "gate_colour": 1.0}, {"stage": "dit", "step": 120, "loss": 0.5},
             {"stage": "vae", "step": 110, "loss": 0.8}]
    run.metrics.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"stage": "vae", "st')
    run.forget_metrics("vae", 100)
    kept = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert kept == lines[:2] + lines[3:4]


def test_contrast_captions_never_name_a_held_out_combination():
    """Swapping a training caption can name a held-out combination (WORLD.md): such rows are not contrasted."""
    from soragen.data.shapes import names_held_out, swap_shapes
    from soragen.train import swapped_rows

    prompts = ["a large magenta circle moving up", "a red ball moving up", "一个品红色的小圆向上移动", "a magenta box moving left"]
    rows, texts = swapped_rows(prompts, np.zeros(4, int), limit=8)
    assert rows == [1, 3] and texts == ["a red ball moving down", "a magenta box moving right"]
    rows, texts = swapped_rows(["a large cyan circle moving left", "a small cyan ball bouncing", "a green box bouncing"],
                               np.zeros(3, int), limit=8, swap=swap_shapes)
    assert rows == [1, 2] and texts == ["a small cyan box bouncing", "a green ball bouncing"]
    assert not any(names_held_out(t) for t in texts) and not names_held_out("not a caption")


def test_bf16_mixed_precision_trains_in_bf16_keeps_fp32_weights_and_resumes_in_fp32(tmp_path, monkeypatch):
    """train.mixed_precision=bf16: the DiT's products run under accelerate's CPU autocast (its attention in fp32),
    the model folder holds fp32 weights, and the run resumes without it from its checkpoint."""
    import soragen.dit

    seen = []
    attention = soragen.dit.attention

    def recording(q, k, v, attn_mask=None, scale=None):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled(), v.dtype))
        out = attention(q, k, v, attn_mask, scale)
        assert out.dtype == torch.float32  # CPU autocast's bf16 flash attention backward was 10x slower
        return out

    monkeypatch.setattr(soragen.dit, "attention", recording)
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.mixed_precision=bf16", "train.dit.stop_after=2"])
    train(cfg)
    assert (True, True, torch.bfloat16) in seen  # a training forward, its values from a bf16 product
    assert RunFolder(tmp_path).latest("dit").name == "dit-0000002"
    seen.clear()
    more = train_config(TINY + [f"train.output_dir={tmp_path}"])  # mixed_precision "no"
    assert train(more, resume=True) == tmp_path / "model"
    assert seen and not any(autocast for autocast, _, _ in seen)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in lines if "loss" in m)


def test_fp16_mixed_precision_without_a_gpu_is_refused_before_the_run_folder(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"'fp16' needs a GPU.*'bf16'"):
        train(train_config(TINY + [f"train.output_dir={run}", "train.mixed_precision=fp16"]))
    assert not run.exists()


def test_accelerate_launchs_mixed_precision_is_named_when_it_is_not_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level("WARNING", logger="soragen"):
        train(train_config(TINY + [f"train.output_dir={tmp_path}", "train.stages=[vae]"]))
    assert "--set train.mixed_precision=bf16" in caplog.text


def test_a_checkpoint_without_a_loss_scale_resumes_in_a_run_that_keeps_one(tmp_path, monkeypatch):
    """fp16 (on a GPU) keeps a loss scaler, which checkpoints written in bf16 or fp32 do not hold: a resume starts
    it afresh instead of failing on the missing state/scaler.pt. A CPU GradScaler stands in for the GPU's."""
    import soragen.train as train_module

    train(train_config(TINY + [f"train.output_dir={tmp_path}", "train.dit.stop_after=2"]))
    assert not (RunFolder(tmp_path).latest("dit") / "state" / "scaler.pt").exists()
    make = train_module._make_accelerator

    def with_scaler(root, mixed_precision):
        acc = make(root, mixed_precision)
        acc.scaler = torch.amp.GradScaler("cpu")
        return acc

    monkeypatch.setattr(train_module, "_make_accelerator", with_scaler)
    assert train(train_config(TINY + [f"train.output_dir={tmp_path}"]), resume=True) == tmp_path / "model"
    assert (RunFolder(tmp_path).latest("dit") / "state" / "scaler.pt").is_file()


def test_a_precision_the_device_has_no_autocast_for_is_refused(tmp_path):
    """accelerate takes fp16 on a CPU (e.g. `accelerate launch --cpu` on a GPU machine) and trains in fp32."""
    from soragen.train import _make_accelerator

    with pytest.raises(UserError, match=r"'fp16' is not available on this run's device \(cpu\); use 'no' or 'bf16'"):
        _make_accelerator(tmp_path, "fp16")


def test_bf16_mixed_precision_with_a_frozen_text_encoder_trains(tmp_path):
    """A frozen text encoder is not prepared by accelerate: soragen runs it under the run's autocast itself."""
    cfg = train_config(TINY + [f"train.output_dir={tmp_path}", "train.mixed_precision=bf16",
                               "text_encoder.trainable=false", "train.dit.direction_contrast=0.03",
                               "train.dit.contrast_from=0"])
    assert train(cfg) == tmp_path / "model"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("contrast" in m for m in lines) and all(math.isfinite(m["loss"]) for m in lines if "loss" in m)


@pytest.mark.skipif(not builtin_installed(), reason="the built-in model is not in this checkout")
def test_decoder_stage_learns_redrawn_windows_of_the_builtin_model(tmp_path):
    """train.decoder.redraw_rows: the built-in DiT generates windows for training captions, the renderer redraws
    those the detector can read, and the decoder learns them beside real clips; the pool is kept for a resume."""
    from safetensors import safe_open

    from soragen.model_io import builtin_path

    run = tmp_path / "redraw"
    shutil.copytree(builtin_path(), run / "model")
    (run / "model" / "vae" / "decoder_finetune.json").unlink()  # the shipped decoder is tuned: tune it again
    settings = [f"train.output_dir={run}", "train.stages=[decoder]", "train.decoder.steps=2",
                "train.decoder.batch_size=2", "train.decoder.clip_frames=9", "train.decoder.clean_fraction=1",
                "train.decoder.redraw_windows=8", "train.decoder.redraw_rows=1", "train.vae_gate_clips=2",
                "train.checkpoint_every=2", "train.log_every=1"]
    train(load_config(ROOT / "configs" / "default.yaml", settings, builtin_default=False), resume=True)
    info = json.loads((run / "model" / "vae" / "decoder_finetune.json").read_text())
    assert info["redraw_windows"] == 8 and info["redraw_rows"] == 1 and 1 <= info["redrawn"] <= 8
    with safe_open(str(run / "redraw_pool.safetensors"), framework="pt") as pool:
        latents, frames = pool.get_tensor("latents"), pool.get_tensor("frames")
        assert latents.shape == (info["redrawn"], 8, 5, 16, 16) and frames.shape == (info["redrawn"], 9, 64, 64, 3)
        assert pool.metadata()["windows"] == "8"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["stage"] == "decoder" and "loss" in m] == [1, 2]


def redraw_dit_settings(run: Path, *more: str) -> list[str]:
    """A tiny DiT fine-tune of the built-in model with 2 redrawn rows of 4 from a pool of 8 windows, in `run`."""
    from soragen.model_io import builtin_path

    return [f"train.output_dir={run}", "train.stages=[dit]", f"train.vae_model={builtin_path()}",
            f"train.dit.init_model={builtin_path()}", "data.clips=6", "data.clip_latent_frames=4",
            "train.dit.window=3", "train.dit.max_context=2", "train.dit.batch_size=4", "train.dit.contrast_from=0",
            "train.dit.redraw_windows=8", "train.dit.redraw_rows=2", "train.log_every=1", "train.sample_every=100",
            *more]


@pytest.mark.skipif(not builtin_installed(), reason="the built-in model is not in this checkout")
def test_dit_stage_learns_redrawn_windows_of_its_init_model(tmp_path):
    """train.dit.redraw_rows: the init model's DiT generates windows for training captions, the renderer redraws
    every one whose objects the detector finds, each as its caption's shape, and the fine-tune takes them beside
    the data's windows (and its twin and contrast rows); the pool is kept and read again on a resume."""
    from safetensors import safe_open

    run = tmp_path / "run"
    settings = redraw_dit_settings(run, "train.dit.steps=2", "train.dit.twin_rows=1", "train.checkpoint_every=2")
    train(load_config(ROOT / "configs" / "default.yaml", settings, builtin_default=False))
    with safe_open(str(run / "dit_redraw_pool.safetensors"), framework="pt") as pool:
        latents, frames, meta = pool.get_tensor("latents"), pool.get_tensor("frames"), pool.metadata()
    captions = json.loads(meta["captions"])
    assert 2 <= len(captions) <= 8 and meta["lean"] == "False" and meta["windows"] == "8"
    assert latents.shape == (len(captions), 8, 3, 16, 16) and frames.shape == (len(captions), 5, 64, 64, 3)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["stage"] == "dit" and "loss" in m] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in lines if "loss" in m)
    before = (run / "dit_redraw_pool.safetensors").stat().st_mtime_ns
    train(load_config(ROOT / "configs" / "default.yaml", settings + ["train.dit.steps=3"], builtin_default=False),
          resume=True)
    assert (run / "dit_redraw_pool.safetensors").stat().st_mtime_ns == before  # read, not made again


@pytest.mark.skipif(not builtin_installed(), reason="the built-in model is not in this checkout")
def test_redraw_motion_takes_only_windows_that_move_as_captioned(tmp_path, caplog):
    """The DiT's pool records, per window, whether the DiT's own objects move as the caption says; with
    train.dit.redraw_motion only those windows are taken, and too few of them is refused in one line."""
    from safetensors import safe_open

    from soragen.model_io import save_file_atomic

    run = tmp_path / "run"
    settings = redraw_dit_settings(run, "train.dit.steps=1", "train.dit.redraw_motion=true",
                                   "train.dit.redraw_shapes=[circle,square,triangle]", "train.checkpoint_every=1")
    path = run / "dit_redraw_pool.safetensors"
    try:
        train(load_config(ROOT / "configs" / "default.yaml", settings, builtin_default=False))
    except UserError as e:  # the DiT moved fewer than 2 of its windows as captioned: the pool is kept all the same
        assert "that move as their captions say (train.dit.redraw_motion)" in str(e)
    with safe_open(str(path), framework="pt") as pool:
        tensors = {name: pool.get_tensor(name) for name in pool.keys()}
        meta = pool.metadata()
    n = len(json.loads(meta["captions"]))
    assert tensors["moves"].dtype == torch.uint8 and tensors["moves"].shape == (n,)
    assert set(tensors["moves"].tolist()) <= {0, 1}
    for moving, outcome in ((2, None), (1, "only 1 of the pool's redrawn windows that move as their captions say")):
        tensors["moves"] = torch.zeros(n, dtype=torch.uint8)
        tensors["moves"][:moving] = 1
        save_file_atomic(tensors, path, metadata=meta)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        shutil.rmtree(run / "model", ignore_errors=True)
        cfg = load_config(ROOT / "configs" / "default.yaml", settings, builtin_default=False)
        caplog.clear()
        if outcome is None:
            with caplog.at_level("INFO", logger="soragen"):
                assert train(cfg, resume=True) == run / "model"
            assert f"redraw rows from 2 of the pool's {n} windows" in caplog.text
        else:
            with pytest.raises(UserError, match=re.escape(outcome) + ".*set train.dit.redraw_motion=false"):
                train(cfg, resume=True)


@pytest.mark.parametrize("caption, moves", [
    ("a green circle moving left and a red square moving up", 1),
    ("a green circle moving up and a red square moving left", 0),
    ("a green circle moving left and a red square moving down", 0),
    ("a large blue ball bouncing", 1),
    ("a large blue ball moving down", 0),
])
def test_moves_as_captioned_judges_every_object_by_the_eval_detector(caption, moves):
    from soragen.data import shapes as S
    from soragen.train import moves_as_captioned

    true = ("a green circle moving left and a red square moving up" if "green" in caption
            else "a large blue ball bouncing")
    frames = S.render(S.scene_from_caption(true, np.random.default_rng(0)), 17)
    assert moves_as_captioned(frames, caption, 8) == moves


def test_a_latent_frame_has_a_target_when_every_frame_it_stands_for_has_one():
    from soragen.train import latent_frames_with_target

    has = torch.tensor([[True, True, False, True, True], [False, True, True, True, True]])  # 5 frames, 3 latent
    assert latent_frames_with_target(has, 2).tolist() == [[True, False, True], [False, True, True]]


def test_redrawn_rows_are_noised_from_the_dits_latents_and_count_only_frames_with_targets():
    """A redrawn row's input is noised from its whole other latents (share 1) and its target is its own x0; a frame
    without a target adds nothing to the loss."""
    from diffusers import DDPMScheduler

    from soragen.train import TwinInputs, dit_loss

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0 = torch.randn(3, 4, 3, 2, 2, dtype=torch.float64)
    text, mask = torch.zeros(3, 1, 8), torch.ones(3, 1, dtype=torch.bool)
    keep = torch.tensor([[True, False, True]])
    redrawn = TwinInputs(torch.tensor([2]), x0[[2]] + 1000.0, (40, 300), share=1.0, keep=keep)
    seen = {}

    class Exact(torch.nn.Module):
        """Predicts the v whose x0 estimate is x0, but for frame 1 of row 2, where it is far off."""

        def forward(self, x, t, text, mask):
            seen["x"], seen["t"] = x, t
            a = sched.alphas_cumprod[t].to(x)[:, None, :, None, None]
            v = (a.sqrt() * x - x0) / (1 - a).sqrt()
            v[2, :, 1] += 50.0
            return v

    loss = dit_loss(Exact(), sched, x0, text, mask, torch.zeros(3, dtype=torch.long), 20,
                    torch.Generator().manual_seed(0), redrawn=redrawn)
    assert loss < 1e-12  # the frame without a target is not counted
    t = seen["t"][2]
    assert ((t >= 40) & (t < 300)).all() and (t == t[0]).all()
    a = sched.alphas_cumprod[t].to(x0)[None, :, None, None]
    noise = (seen["x"][2] - a.sqrt() * (x0[2] + 1000.0)) / (1 - a).sqrt()  # noised from the moved latents, whole
    assert noise.abs().max() < 10


@pytest.mark.parametrize("settings, fragment", [
    (["train.decoder.redraw_rows=2", "train.decoder.redraw_windows=8"],
     "train.decoder.redraw_rows 2 must be less than train.decoder.batch_size 2; give at most 1"),
    (["train.decoder.redraw_rows=1"], "train.decoder.redraw_rows 1 needs at least as many train.decoder.redraw_windows, got 0"),
    (["train.decoder.redraw_windows=8"], "train.decoder.redraw_windows 8 makes windows no batch would use"),
    (["train.decoder.redraw_rows=1", "train.decoder.redraw_windows=8", "data.kind=manifest", "data.path={data}"],
     "train.decoder.redraw_rows needs data.kind shapes (the Shapes World renderer redraws the windows), got manifest"),
    (["train.dit.redraw_windows=8"], "train.dit.redraw_windows 8 makes windows no batch would use"),
    (["train.dit.redraw_rows=2", "train.dit.redraw_windows=8", "train.dit.batch_size=2"],
     "train.dit.redraw_rows 2 must be less than train.dit.batch_size 2; give at most 1"),
    (["train.dit.redraw_rows=1"], "train.dit.redraw_rows 1 needs at least as many train.dit.redraw_windows, got 0"),
    (["train.dit.redraw_rows=1", "train.dit.redraw_windows=8"],
     "train.dit.redraw_rows redraws windows a trained DiT generated: set train.dit.init_model"),
    (["train.dit.redraw_rows=1", "train.dit.redraw_windows=8", "data.kind=manifest", "data.path={data}"],
     "train.dit.redraw_rows needs data.kind shapes"),
])
def test_redraw_settings_are_refused_before_training(tmp_path, settings, fragment):
    from soragen.data.clips import write_shapes_dataset

    if any("{data}" in s for s in settings):  # a dataset of video files: nothing to redraw them with
        write_shapes_dataset(tmp_path / "data", num=2, seconds=1.0, seed=0)
        settings = [s.format(data=tmp_path / "data") for s in settings]
    cfg = train_config(TINY + [f"train.output_dir={tmp_path / 'run'}", "train.stages=[vae,dit,decoder]",
                              "train.decoder.batch_size=2", "train.decoder.last_steps=2"] + settings)
    with pytest.raises(UserError, match=re.escape(fragment)):
        train(cfg)
    assert not (tmp_path / "run").exists()
