"""The tiny Qwen3-Next checkpoint builder: determinism, reuse, dims, MTP keys, HF loading."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import pathlib

import pytest
import torch
from safetensors import safe_open

from tests.utils import FAMILIES, SUCCESSOR_PERIOD, successor_fields
from vllm_kvbuffer.tools import tiny_checkpoint as tc
from vllm_kvbuffer.tools.tiny_checkpoint import MARKER_NAME, build_tiny_qwen3_next

# Small non-default dims: odd head counts, K != V, HV/H = 3, full attention every 3rd layer.
CUSTOM = dict(
    num_layers=3,
    full_attention_interval=3,
    hidden_size=96,
    linear_num_key_heads=1,
    linear_num_value_heads=3,
    linear_key_head_dim=32,
    linear_value_head_dim=48,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=3,
    dtype="float32",
    seed=7,
)


def _tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _files(path: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def default_ckpt(tmp_path_factory) -> pathlib.Path:
    return build_tiny_qwen3_next(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory) -> pathlib.Path:
    return build_tiny_qwen3_next(tmp_path_factory.mktemp("mtp"), mtp=True)


def test_deterministic_bytes(default_ckpt, tmp_path):
    again = build_tiny_qwen3_next(tmp_path / "again")
    a, b = _files(default_ckpt), _files(again)
    assert sorted(a) == sorted(b)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json",
                 "generation_config.json", MARKER_NAME):
        assert name in a
    for name in a:
        assert a[name] == b[name], f"{name} differs between two builds with the same arguments"


def test_marker_reuse_skips_rebuild(default_ckpt, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in default_ckpt.iterdir()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt although the marker matches")

    monkeypatch.setattr(tc, "build_state_dict", no_rebuild)
    monkeypatch.setattr(tc, "_build_tokenizer", no_rebuild)
    assert build_tiny_qwen3_next(default_ckpt) == default_ckpt.resolve()
    assert {p.name: p.stat().st_mtime_ns for p in default_ckpt.iterdir()} == before
    # Different arguments (or force) do rebuild.
    with pytest.raises(AssertionError, match="rebuilt"):
        build_tiny_qwen3_next(default_ckpt, seed=1)
    with pytest.raises(AssertionError, match="rebuilt"):
        build_tiny_qwen3_next(default_ckpt, force=True)


def test_changed_args_or_missing_file_rebuild(tmp_path):
    out = build_tiny_qwen3_next(tmp_path / "ckpt", **CUSTOM)
    first = (out / "model.safetensors").read_bytes()
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["args"]["seed"] == CUSTOM["seed"]

    build_tiny_qwen3_next(out, **{**CUSTOM, "seed": CUSTOM["seed"] + 1})
    assert (out / "model.safetensors").read_bytes() != first
    assert json.loads((out / MARKER_NAME).read_text())["args"]["seed"] == CUSTOM["seed"] + 1

    build_tiny_qwen3_next(out, **CUSTOM)
    assert (out / "model.safetensors").read_bytes() == first
    (out / "tokenizer.json").unlink()
    build_tiny_qwen3_next(out, **CUSTOM)  # incomplete folder: rebuilt, not reused
    assert (out / "tokenizer.json").is_file()


def test_custom_dims_in_config_and_weights(tmp_path):
    out = build_tiny_qwen3_next(tmp_path / "custom", **CUSTOM)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3NextForCausalLM"]
    assert cfg["model_type"] == "qwen3_next"
    for key in ("hidden_size", "linear_num_key_heads", "linear_num_value_heads",
                "linear_key_head_dim", "linear_value_head_dim", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts"):
        assert cfg[key] == CUSTOM[key], key
    assert cfg["num_hidden_layers"] == 3
    assert cfg["layer_types"] == ["linear_attention", "linear_attention", "full_attention"]
    assert cfg["vocab_size"] == tc.VOCAB_SIZE
    assert cfg["dtype"] == "float32"
    assert "num_nextn_predict_layers" not in cfg

    t = _tensors(out)
    assert all(v.dtype == torch.float32 for v in t.values())
    assert not any(k.startswith("mtp.") for k in t)
    H, key_dim, value_dim = 96, 1 * 32, 3 * 48
    a = "model.layers.0.linear_attn."
    assert t[a + "in_proj_qkvz.weight"].shape == (2 * key_dim + 2 * value_dim, H)
    assert t[a + "in_proj_ba.weight"].shape == (2 * 3, H)
    assert t[a + "conv1d.weight"].shape == (2 * key_dim + value_dim, 1, 4)
    assert t[a + "A_log"].shape == t[a + "dt_bias"].shape == (3,)
    assert t[a + "norm.weight"].shape == (48,)
    assert t[a + "out_proj.weight"].shape == (H, value_dim)
    s = "model.layers.2.self_attn."
    assert t[s + "q_proj.weight"].shape == (2 * 6 * 16, H)  # query + output gate
    assert t[s + "k_proj.weight"].shape == t[s + "v_proj.weight"].shape == (2 * 16, H)
    assert t[s + "o_proj.weight"].shape == (H, 6 * 16)
    assert "model.layers.2.linear_attn.A_log" not in t
    assert "model.layers.0.self_attn.q_proj.weight" not in t
    assert t["model.layers.1.mlp.gate.weight"].shape == (3, H)
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in t
    assert "model.layers.1.mlp.experts.3.down_proj.weight" not in t

    # And it loads in HF with exactly these weights.
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model(torch.tensor([[5, 70, 300, 900, 12]])).logits
    assert logits.shape == (1, 5, tc.VOCAB_SIZE) and torch.isfinite(logits).all()


MTP_LAYER_SHAPES = {
    "input_layernorm.weight": lambda H, E: (H,),
    "post_attention_layernorm.weight": lambda H, E: (H,),
    "self_attn.q_proj.weight": lambda H, E: (2 * 4 * 64, H),
    "self_attn.k_proj.weight": lambda H, E: (2 * 64, H),
    "self_attn.v_proj.weight": lambda H, E: (2 * 64, H),
    "self_attn.o_proj.weight": lambda H, E: (H, 4 * 64),
    "self_attn.q_norm.weight": lambda H, E: (64,),
    "self_attn.k_norm.weight": lambda H, E: (64,),
    "mlp.gate.weight": lambda H, E: (E, H),
    "mlp.shared_expert.gate_proj.weight": lambda H, E: (128, H),
    "mlp.shared_expert.up_proj.weight": lambda H, E: (128, H),
    "mlp.shared_expert.down_proj.weight": lambda H, E: (H, 128),
    "mlp.shared_expert_gate.weight": lambda H, E: (1, H),
}


def test_mtp_keys_and_shapes(mtp_ckpt, default_ckpt):
    H, E = 256, 4
    expected = {
        "mtp.fc.weight": (H, 2 * H),
        "mtp.pre_fc_norm_embedding.weight": (H,),
        "mtp.pre_fc_norm_hidden.weight": (H,),
        "mtp.norm.weight": (H,),
    }
    expected.update({f"mtp.layers.0.{k}": f(H, E) for k, f in MTP_LAYER_SHAPES.items()})
    for e in range(E):
        expected[f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight"] = (128, H)
        expected[f"mtp.layers.0.mlp.experts.{e}.up_proj.weight"] = (128, H)
        expected[f"mtp.layers.0.mlp.experts.{e}.down_proj.weight"] = (H, 128)

    t = _tensors(mtp_ckpt)
    got = {k: tuple(v.shape) for k, v in t.items() if k.startswith("mtp.")}
    assert got == expected
    cfg = json.loads((mtp_ckpt / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1  # vLLM: n_predict / Qwen3NextMTP layer count

    # Per-tensor seeding: adding the MTP layer leaves the main model's weights untouched.
    base = _tensors(default_ckpt)
    assert set(base) == {k for k in t if not k.startswith("mtp.")}
    assert all(torch.equal(base[k], t[k]) for k in base)


def test_gdn_parameters_and_peaky_head(tmp_path):
    t = _tensors(build_tiny_qwen3_next(tmp_path / "peaky", lm_head_std=0.5, dtype="float32"))
    for i in range(3):  # layers 0..2 are GDN with the default interval of 4
        A = t[f"model.layers.{i}.linear_attn.A_log"].exp()
        dt = torch.nn.functional.softplus(t[f"model.layers.{i}.linear_attn.dt_bias"])
        assert ((A >= 1 - 1e-4) & (A <= 16 + 1e-3)).all(), A
        assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all(), dt
    assert abs(t["lm_head.weight"].std().item() - 0.5) < 0.02
    assert abs(t["model.layers.0.mlp.gate.weight"].std().item() - 0.05) < 0.01


def test_tokenizer(default_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_ckpt))
    assert len(tok) == tc.VOCAB_SIZE
    assert [tok.convert_tokens_to_ids(s) for s in tc.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.bos_token is None
    text = "Hello world, the quick brown fox! ünïcødé 😀 KVBuffer 12345"
    ids = tok(text).input_ids
    assert max(ids) < tc.VOCAB_SIZE
    assert tok.decode(ids) == text  # byte-level: any text round-trips
    assert len(tok("the model writes tokens").input_ids) <= 6  # merges learned common words
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok(chat).input_ids)[0] == "<|im_start|>"


def _assert_hf_uses_torch_gdn() -> None:
    """The HF reference must run its pure-torch GDN: with fla importable on a CPU box it picks
    fla's Triton kernels and crashes (or, worse, differs), see design/environment.md."""
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    names = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
             "causal_conv1d_fn", "causal_conv1d_update")
    for name in names:
        fn = getattr(hf, name)
        nonlocals = inspect.getclosurevars(fn).nonlocals if hasattr(fn, "__wrapped__") else {}
        if "implementation" in nonlocals:  # transformers' use_kernel_func_from_hub_with_fallback
            assert nonlocals["implementation"] is fn.__wrapped__, f"HF {name} is not the torch path"
        else:  # unknown wrapper layout: fall back to "the alternatives are not installed"
            assert importlib.util.find_spec("fla") is None, "flash-linear-attention is importable"
            assert importlib.util.find_spec("causal_conv1d") is None, "causal_conv1d is importable"


def test_hf_loads_fp32_finite_logits(mtp_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _assert_hf_uses_torch_gdn()
    tok = AutoTokenizer.from_pretrained(str(mtp_ckpt))
    model, info = AutoModelForCausalLM.from_pretrained(str(mtp_ckpt), dtype=torch.float32,
                                                       output_loading_info=True)
    assert type(model).__name__ == "Qwen3NextForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # mtp.* ignored by HF
    assert all(p.dtype == torch.float32 for p in model.parameters())

    ids = torch.tensor([tok("The gated delta rule writes the state of the model.").input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert logits.shape == (ids.shape[1], tc.VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # not degenerate: tokens get different scores

    # The cached path (conv state + recurrent GDN decode) agrees with the full forward.
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    assert torch.isfinite(step).all()
    torch.testing.assert_close(step, logits[-1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_layers=0), "num_layers must be a positive int"),
        (dict(hidden_size=64.0), "hidden_size must be a positive int"),
        (dict(linear_num_key_heads=3, linear_num_value_heads=4),
         "multiple of linear_num_key_heads"),
        (dict(num_attention_heads=3, num_key_value_heads=2), "multiple of num_key_value_heads"),
        (dict(num_experts=0), "num_experts must be >= 1"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(lm_head_std=0.0), "lm_head_std must be a positive finite float"),
        (dict(lm_head_std=math.inf), "lm_head_std must be a positive finite float"),
    ],
)
def test_invalid_args(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_tiny_qwen3_next(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_cli(tmp_path, capsys):
    tc.main(["--out", str(tmp_path / "cli"), "--num-layers", "2", "--full-attention-interval", "2",
             "--hidden-size", "64", "--linear-num-key-heads", "1", "--linear-num-value-heads", "2",
             "--linear-key-head-dim", "16", "--linear-value-head-dim", "16",
             "--num-attention-heads", "2", "--num-key-value-heads", "1", "--head-dim", "16",
             "--num-experts", "2", "--mtp", "--dtype", "float16", "--seed", "3",
             "--lm-head-std", "0.3"])
    report = json.loads(capsys.readouterr().out)
    assert report["args"] == {
        "num_layers": 2, "full_attention_interval": 2, "hidden_size": 64, "linear_num_key_heads": 1,
        "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "num_experts": 2,
        "mtp": True, "dtype": "float16", "seed": 3, "lm_head_std": 0.3,
    }
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["layer_types"] == ["linear_attention", "full_attention"]
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["dtype"] == "float16"
    assert _tensors(tmp_path / "cli")["mtp.fc.weight"].dtype == torch.float16


def test_cli_options_are_generated_from_the_spec():
    """One description of the fields: every spec field is a CLI option with the field's default
    and description; nothing else but --out and --force."""
    import dataclasses

    actions = {a.dest: a for a in tc._parser()._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(tc.TinyQwen3NextSpec)}
    assert set(actions) == set(fields) | {"out", "force"}
    for name, f in fields.items():
        a = actions[name]
        assert a.option_strings == ["--" + name.replace("_", "-")]
        assert a.default == f.default and a.help.replace("%%", "%").startswith(f.metadata["help"])
    assert actions["dtype"].choices == ("bfloat16", "float16", "float32")
    assert actions["mtp"].const is True and actions["mtp"].nargs == 0    # a flag


# -- the other families (laid out by transformers) ----------------------------------------------

FAMILY_ARGS = {
    "qwen3_5": dict(arch="qwen3_5", mtp=True),
    "qwen3_5_moe": dict(arch="qwen3_5_moe", mtp=True),
    "qwen3_5_vl": dict(arch="qwen3_5", vision=True),
    "olmo_hybrid": dict(arch="olmo_hybrid", neg_eigval=True),
}


@pytest.mark.parametrize("family", list(FAMILY_ARGS))
def test_other_families_deterministic_and_load_in_hf(tmp_path, family):
    """Each family: the same bytes twice (also with transformers' own init drawing from the
    global generator in between), the architecture and dims in the config, every weight of the
    HF model in the file (nothing missing, nothing left at transformers' init), the MTP layer's
    keys under ``mtp.`` where asked, and the global RNG left as it was."""
    import transformers

    args = dict(FAMILY_ARGS[family], dtype="float32")
    rng = torch.random.get_rng_state()
    a = tc.build_tiny_checkpoint(tmp_path / "a", **args)
    assert torch.equal(torch.random.get_rng_state(), rng)
    torch.manual_seed(123)
    b = tc.build_tiny_checkpoint(tmp_path / "b", **args)
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb) and all(fa[n] == fb[n] for n in fa)

    spec = tc.TinyCheckpointSpec(**args)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == [spec.architecture]
    text = cfg.get("text_config", cfg)
    assert text["layer_types"] == spec.layer_types
    assert (text["linear_num_key_heads"], text["linear_num_value_heads"]) == (2, 4)
    if family == "olmo_hybrid":
        assert cfg["linear_allow_neg_eigval"] is True
    model, info = getattr(transformers, spec.architecture).from_pretrained(
        str(a), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    saved = _tensors(a)
    mtp = sorted(k for k in saved if k.startswith("mtp."))
    assert bool(mtp) == bool(args.get("mtp")), mtp[:5]
    if mtp:
        assert {"mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight",
                "mtp.pre_fc_norm_hidden.weight"} <= set(mtp)
        assert any(k.startswith("mtp.layers.0.self_attn.") for k in mtp)
    # Every linear weight comes from the builder's draws: std near 0.05, not transformers' 0.02.
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed" not in name and "lm_head" not in name and p.numel() > 1000:
            assert 0.04 < float(p.std()) < 0.06, (name, float(p.std()))


def test_family_options_are_checked(tmp_path):
    for kwargs, match in [(dict(arch="llama"), "arch must be one of"),
                          (dict(arch="olmo_hybrid", mtp=True), "no MTP drafter"),
                          (dict(arch="qwen3_next", vision=True), "no vision-language class"),
                          (dict(arch="qwen3_5", neg_eigval=True), "only olmo_hybrid")]:
        with pytest.raises(ValueError, match=match):
            tc.build_tiny_checkpoint(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
    # Fields added after the first version stay out of a Qwen3-Next build's identity.
    assert set(tc.TinyCheckpointSpec().to_json_dict()) == {
        f for f in tc.TinyCheckpointSpec.__dataclass_fields__ if f not in tc._LATER_FIELDS}


# -- successor checkpoints (drafts accepted and rejected) ---------------------------------------

# The successor variants the engine tests use (tests/utils.py), one per family.
SUCCESSOR_FAMILIES = {"qwen3_next": dict(arch="qwen3_next", mtp=True),
                      **{f: fields for f, (fields, _) in FAMILIES.items()}}
CYCLE_PROMPT = [100 + i % SUCCESSOR_PERIOD for i in range(4 * SUCCESSOR_PERIOD)]
GREEDY_STEPS = 200
# Stated bounds on HF fp32 greedy text from CYCLE_PROMPT: the fraction of steps whose token is
# the successor of the one before (n-gram and MTP drafts of the successor accepted there), and
# how often the text leaves the cycle (drafts rejected). Measured: 0.68-0.76 and 34-40 times.
FOLLOW_BAND = (0.5, 0.9)
MIN_LEAVES = 10
# The layers' share of every logit: at each position of that text (prompt and 60 greedy
# tokens), how much the log-probability of the next token (what an engine reports) changes between
# layer_scale 0 (the embeddings alone) and the family's value. Measured: 1.7-2.3 at least.
MIN_LAYER_EFFECT = 1.0


def _successor_fields(family: str, **overrides) -> dict:
    return {**SUCCESSOR_FAMILIES[family], **successor_fields(SUCCESSOR_FAMILIES[family]["arch"]),
            "dtype": "float32", **overrides}


@pytest.fixture(scope="module")
def successor_ckpts(tmp_path_factory):
    """family -> its successor checkpoint (built once per module, on first use)."""
    root, built = tmp_path_factory.mktemp("successor"), {}

    def get(family: str) -> pathlib.Path:
        if family not in built:
            built[family] = tc.build_tiny_checkpoint(root / family, **_successor_fields(family))
        return built[family]
    return get


def _greedy(path: pathlib.Path, prompt: list[int], steps: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=steps, min_new_tokens=steps)
    return out[0, len(prompt):].tolist()


def _logprobs(path: pathlib.Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("family", list(SUCCESSOR_FAMILIES))
def test_successor_checkpoint_deterministic(successor_ckpts, tmp_path, family):
    a = successor_ckpts(family)
    b = tc.build_tiny_checkpoint(tmp_path / "b", **_successor_fields(family))
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb) and all(fa[n] == fb[n] for n in fa)
    args = json.loads((a / MARKER_NAME).read_text())["args"]
    assert args["successor_period"] == SUCCESSOR_PERIOD
    assert args["layer_scale"] == tc.SUCCESSOR_LAYER_SCALES[SUCCESSOR_FAMILIES[family]["arch"]]


@pytest.mark.parametrize("family", list(SUCCESSOR_FAMILIES))
def test_successor_weights(successor_ckpts, tmp_path, family):
    """Against the plain checkpoint of the same family: lm_head row succ(i) is embedding row i;
    the layers' residual outputs are scaled by layer_scale (OLMo Hybrid's post-norm attention
    layers: their post norms), the MTP layer passes its embedding input through; every other
    tensor is the plain one."""
    fields = _successor_fields(family)
    scale = fields["layer_scale"]
    t = _tensors(successor_ckpts(family))
    plain = _tensors(tc.build_tiny_checkpoint(
        tmp_path / "plain", **_successor_fields(family, successor_period=None, layer_scale=1.0)))
    assert set(t) == set(plain)
    emb, head = t["model.embed_tokens.weight"], t["lm_head.weight"]
    succ = tc.successor_ids(emb.shape[0], SUCCESSOR_PERIOD)
    assert succ[100:106].tolist() == [101, 102, 103, 104, 100, 106]
    assert succ[-4:].tolist() == [1021, 1022, 1023, 1020]    # 1024 ids: the last group has 4
    assert sorted(succ.tolist()) == list(range(emb.shape[0]))   # a permutation
    assert torch.equal(head[succ], emb * (0.05 / 0.5))   # scaled to a random head's std
    changed = {"lm_head.weight"}
    kinds = tc.TinyCheckpointSpec(**fields).layer_types
    for name in t:
        layer = name.startswith("model.layers.")
        post_norm = (layer and family == "olmo_hybrid"
                     and kinds[int(name.split(".")[2])] == "full_attention")
        if layer and name.endswith(("post_attention_layernorm.weight",
                                    "post_feedforward_layernorm.weight") if post_norm else
                                   ("out_proj.weight", "o_proj.weight", "down_proj.weight")):
            torch.testing.assert_close(t[name], plain[name] * scale, rtol=1e-6, atol=0)
            changed.add(name)
        elif name.startswith("mtp.layers.") and name.endswith(("o_proj.weight",
                                                               "down_proj.weight")):
            torch.testing.assert_close(t[name], plain[name] * 0.01, rtol=1e-6, atol=0)
            changed.add(name)
    if "mtp.fc.weight" in t:
        D = emb.shape[1]
        assert torch.equal(t["mtp.fc.weight"], torch.cat([torch.eye(D), torch.zeros(D, D)], 1))
        changed.add("mtp.fc.weight")
    # Every layer has outputs scaled: 3 GDN + 1 attention mixer, 4 MLPs (every expert's).
    assert sum(n.startswith("model.layers.") for n in changed) >= 8
    assert all(torch.equal(t[n], plain[n]) for n in t if n not in changed)


@pytest.mark.parametrize("family", list(SUCCESSOR_FAMILIES))
def test_successor_greedy_follows_cycle_and_leaves_it(successor_ckpts, family):
    """HF fp32 greedy text from a prompt walking a cycle: mostly the successor of the token
    before (drafts accepted), but it leaves the cycle now and then (drafts rejected)."""
    _assert_hf_uses_torch_gdn()
    gen = _greedy(successor_ckpts(family), CYCLE_PROMPT, GREEDY_STEPS)
    succ = tc.successor_ids(tc.VOCAB_SIZE, SUCCESSOR_PERIOD)
    follows = [tok == int(succ[prev]) for prev, tok in zip(CYCLE_PROMPT[-1:] + gen, gen)]
    frac = sum(follows) / len(follows)
    leaves = sum(a and not b for a, b in zip([True] + follows, follows))
    assert FOLLOW_BAND[0] <= frac <= FOLLOW_BAND[1], (family, frac, gen[:40])
    assert leaves >= MIN_LEAVES, (family, leaves, gen[:40])


@pytest.mark.parametrize("family", list(SUCCESSOR_FAMILIES))
def test_successor_layers_shape_every_logit(successor_ckpts, tmp_path, family):
    """The GDN and attention layers are still in the residual stream and the head does not
    saturate: teacher-forced on the greedy text, the log-probability of every next token
    differs from that of the same checkpoint with layer_scale 0 (the embeddings alone), so a
    wrong GDN state shows in the logprobs also where the greedy token would be the same."""
    path = successor_ckpts(family)
    ids = CYCLE_PROMPT + _greedy(path, CYCLE_PROMPT, 60)
    zero = tc.build_tiny_checkpoint(tmp_path / "zero", **_successor_fields(family, layer_scale=0))
    lp, lp0 = _logprobs(path, ids), _logprobs(zero, ids)
    # At layer_scale 0 the successor is the argmax everywhere.
    succ = tc.successor_ids(tc.VOCAB_SIZE, SUCCESSOR_PERIOD)
    assert torch.equal(lp0.argmax(-1), succ[torch.tensor(ids)])
    nxt = torch.tensor(ids[1:])[:, None]
    effect = (lp[:-1].gather(1, nxt) - lp0[:-1].gather(1, nxt)).abs()[:, 0]
    assert float(effect.min()) > MIN_LAYER_EFFECT, (family, float(effect.min()), effect[:10])
    # On the cycle too (where the token is the successor), the logprob is not saturated.
    on_cycle = torch.tensor(ids[1:]) == succ[torch.tensor(ids[:-1])]
    assert bool(on_cycle.any()) and float(lp[:-1].gather(1, nxt)[on_cycle].max()) < -0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(successor_period=1), "successor_period must be an int >= 2 or None, got 1"),
     (dict(successor_period=2.0), "successor_period must be an int >= 2 or None, got 2.0"),
     (dict(successor_period=True), "successor_period must be an int >= 2 or None, got True"),
     (dict(layer_scale=-0.5), r"layer_scale must be a finite float >= 0, got -0\.5"),
     (dict(layer_scale=math.nan), "layer_scale must be a finite float >= 0, got nan"),
     (dict(layer_scale="2"), "layer_scale must be a finite float >= 0, got '2'")],
)
def test_successor_invalid_args(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tc.build_tiny_checkpoint(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_successor_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    tc.main(["--out", str(out), "--arch", "qwen3_5", "--mtp", "--dtype", "float32",
             "--successor-period", "5", "--layer-scale", "2"])
    report = json.loads(capsys.readouterr().out)
    assert report["args"] == {"num_layers": 4, "full_attention_interval": 4, "hidden_size": 256,
                              "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                              "linear_key_head_dim": 64, "linear_value_head_dim": 64,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                              "num_experts": 4, "mtp": True, "dtype": "float32", "seed": 0,
                              "lm_head_std": None, "arch": "qwen3_5", "successor_period": 5,
                              "layer_scale": 2.0}
    t = _tensors(out)
    succ = tc.successor_ids(tc.VOCAB_SIZE, 5)
    assert torch.equal(t["lm_head.weight"][succ], t["model.embed_tokens.weight"] * 0.1)
    # The defaults (no option given): plain random weights, the same identity as before.
    actions = {a.dest: a for a in tc._parser()._actions}
    assert actions["successor_period"].default is None and actions["successor_period"].type is int
    assert actions["layer_scale"].default == 1.0 and actions["layer_scale"].type is float
