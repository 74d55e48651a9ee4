"""scripts/ship_model.py's card for a model trained in phases: a line per run folder, from what the runs recorded."""

import json
from pathlib import Path

from conftest import load_script

from soragen.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, overrides: list[str], steps: dict[str, int]) -> Path:
    """A run folder as `soragen train` leaves it: its config and one metric line every 25 steps, 2 s apart."""
    folder.mkdir()
    cfg = load_config(ROOT / "configs" / "default.yaml", [f"train.output_dir={folder}", *overrides])
    (folder / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    lines, clock = [], 1000.0
    for stage, last in steps.items():
        for step in range(25, last + 1, 25):
            clock += 2.0
            lines.append(json.dumps({"stage": stage, "step": step, "time": clock, "loss": 0.1}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_phase_lines_name_the_steps_time_and_settings_beyond_the_recipe(tmp_path):
    sm = load_script("ship_model")
    recipe = sm.flat(load_config(ROOT / "configs" / "default.yaml").model_dump(mode="json"))
    base = fake_run(tmp_path / "base", ["train.vae.shape_separation=0.3", "train.vae.batch_size=12",
                                        "train.dit.lr=1e-4"], {"vae": 600, "dit": 3600})
    tune = fake_run(tmp_path / "tune1", ["train.stages=[dit]", "train.dit.steps=600", "train.dit.twin_rows=4",
                                         "train.vae.lr=5e-4"], {"dit": 600})
    line = sm.phase_line(base, recipe)
    assert line.startswith("- Phase `base`: vae 600 steps (1 min), dit 3,600 steps (5 min); ")
    assert "vae.shape_separation=0.3" in line and "vae.batch_size=12" in line and "dit.lr=0.0001" in line
    assert "output_dir" not in line
    line = sm.phase_line(tune, recipe)
    assert line.startswith("- Phase `tune1`: dit 600 steps (1 min); ") and "dit.twin_rows=4" in line
    assert "vae.lr" not in line  # a setting of a stage the phase did not train is not named
    assert sm.phase_line(fake_run(tmp_path / "plain", [], {"vae": 50}), recipe).endswith("configs/default.yaml as it is")


def test_a_fine_tune_of_a_shipped_model_keeps_its_phases_and_wall_time():
    """--after MODEL: the card of the model the runs fine-tuned gives its phase lines and its wall time per stage."""
    sm = load_script("ship_model")
    card = (ROOT / "src" / "soragen" / "weights" / "shapes" / "README.md").read_text(encoding="utf-8")
    lines, times = sm.earlier_phases(card)
    assert lines and all(line.startswith(("- Phase `", "- History:", "- Decoder:")) for line in lines)
    assert not any(line.startswith("- Decoder:") for line in lines)  # written again from the model folder
    assert lines[0].startswith("- Phase `") and any(line.startswith("- History:") for line in lines)
    assert set(times) >= {"vae", "dit"} and all(t > 0 for t in times.values())
    assert sm.earlier_phases("# a card\n- Wall time on 2 CPU cores: dit 5 min (total 5 min)") == ([], {"dit": 300.0})


def test_a_dit_phase_on_a_tuned_decoder_ships_that_decoders_record(tmp_path):
    """A DiT phase exports its VAE without decoder_finetune.json; when that VAE is an earlier model's (compared as
    the package stores it, in float16), the card takes that model's record of its decoder, and only then."""
    import torch
    from safetensors.torch import save_file

    sm = load_script("ship_model")
    weights = {"decoder.w": torch.randn(4, 4), "steps": torch.tensor([3])}
    for name, tensors in (("tuned", weights), ("dit", {k: v.double() if v.is_floating_point() else v
                                                          for k, v in weights.items()}),
                          ("other", {"decoder.w": weights["decoder.w"] + 1, "steps": weights["steps"]})):
        (tmp_path / name / "vae").mkdir(parents=True)
        save_file(tensors, str(tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "tuned" / "vae" / "decoder_finetune.json").write_text('{"steps": 400}')
    assert sm.carried_decoder(tmp_path / "dit", [tmp_path / "tuned"]) == tmp_path / "tuned" / "vae" / "decoder_finetune.json"
    assert sm.carried_decoder(tmp_path / "other", [tmp_path / "tuned"]) is None  # another decoder
    assert sm.carried_decoder(tmp_path / "tuned", [tmp_path / "tuned"]) is None  # it has its own record
