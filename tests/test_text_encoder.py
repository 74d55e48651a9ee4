import torch

from soragen.config import TextEncoderConfig
from soragen.text_encoder import TextEncoder


def small() -> TextEncoder:
    return TextEncoder.from_config(TextEncoderConfig(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, max_length=24))


def test_bytes_cover_any_language():
    enc = small()
    tokens, mask = enc(["a red ball", "一位时尚的女士漫步在东京的街道", ""])
    assert tokens.shape == (3, 24, 32) and mask.shape == (3, 24)
    assert mask[0].sum() == len("a red ball") + 1  # bytes + </s>
    assert mask[1].sum() == 24  # 14 CJK chars = 42 bytes: truncated to the limit
    assert mask[2].sum() == 1  # the empty prompt is just </s>
    assert torch.all(tokens[~mask] == 0)


def test_long_prompt_truncated_with_warning(caplog):
    enc = small()
    with caplog.at_level("WARNING", logger="soragen"):
        tokens, mask = enc(["x" * 10_000])
    assert tokens.shape == (1, 24, 32)
    assert "truncated" in caplog.text


def test_pretrained_folder_loads_frozen(tmp_path):
    """A T5 saved with save_pretrained loads through the `pretrained` path and gives the same tokens."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    t5.save_pretrained(tmp_path, safe_serialization=True)
    ByT5Tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    enc = TextEncoder.from_config(TextEncoderConfig(pretrained=str(tmp_path), max_length=16))
    assert enc.dim == 32
    assert not any(p.requires_grad for p in enc.parameters())
    tokens, mask = enc(["a blue square"])
    ids = torch.tensor([list(b"a blue square")]) + 3
    ids = torch.cat([ids, torch.ones(1, 1, dtype=torch.long)], dim=1)  # + </s>
    with torch.no_grad():
        ref = t5(input_ids=ids).last_hidden_state
    torch.testing.assert_close(tokens[0, : ids.shape[1]], ref[0], atol=1e-5, rtol=1e-5)


def _save_tiny_t5(folder):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).save_pretrained(
        folder, safe_serialization=True
    )
    ByT5Tokenizer().save_pretrained(folder)


def _load_in_subprocess(name: str, env: dict):
    import os
    import subprocess
    import sys

    code = (
        "import sys\nfrom soragen.errors import UserError\nfrom soragen.text_encoder import TextEncoder\n"
        f"try:\n    print(TextEncoder.from_pretrained({name!r}, 16).dim)\n"
        "except UserError as e:\n    print(e); sys.exit(2)\n"
    )
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_hub_id_loads_from_the_local_cache(tmp_path):
    """A hub id already in the Hugging Face cache loads from it without asking the network."""
    snapshot = tmp_path / "models--soragen-test--tiny-t5" / "snapshots" / ("0" * 40)
    _save_tiny_t5(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    done = _load_in_subprocess("soragen-test/tiny-t5", {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "0"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "32"


def test_hub_id_offline_fails_at_once(tmp_path):
    """Offline and not cached: one clear message at once, not half a minute of retries."""
    done = _load_in_subprocess("soragen-test/not-cached", {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert done.stdout.strip().startswith("T5 text encoder 'soragen-test/not-cached' is not in the Hugging Face cache")
    assert "Retrying" not in done.stderr
