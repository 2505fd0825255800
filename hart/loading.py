"""Loading models in every layout, with errors that say what is wrong (all `CheckpointError`).

`HARTPipeline.from_folder` and `load_image_tokenizer` take any layout (`detect_layout`): this package's
(`model_index.json`), a training run folder (its exported `pipeline/`) or the official release. For
the official one, the `*_tokenizer*` functions map the tokenizer folder (`config.json` +
`model.safetensors` / `pytorch_model.bin`) onto `HybridTokenizer`, the `*_transformer*` functions the
`llm/` folder onto `HARTTransformer`; every size comes from the checkpoint's own config. Every model is
built empty and filled in the requested dtype, each tensor cast as it is read (`hart.weights`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch
from safetensors import safe_open

from .models.tokenizer import HybridTokenizer
from .models.transformer import HARTTransformer
from .weights import (  # noqa: F401  (CheckpointError, read_weights, load_checked: this module's API too)
    DIFFUSERS_WEIGHTS, CheckpointError, PathLike, empty_model, first_line, fit_problems, load_checked, read_config,
    read_weights)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Codebook-usage statistics of the reference quantizer: saved, never needed to run the model.
OFFICIAL_TOKENIZER_TOLERATED = (r"quantize\.ema_vocab_hit_SV",)


# ---------------------------------------------------------------------------- tokenizer
def tokenizer_config_from_official(cfg: Mapping, source: PathLike = "tokenizer config.json") -> dict:
    """Official tokenizer `config.json` fields -> `HybridTokenizer` keyword arguments."""
    missing = [k for k in ("vocab_size", "z_channels", "ch", "ch_mult", "v_patch_nums") if k not in cfg]
    if missing:
        raise CheckpointError(f"{source} lacks the tokenizer size fields {missing}")
    quantizer_type = cfg.get("quantizer_type", "var")  # the official config class default
    if quantizer_type not in ("var", "var_hybrid"):
        raise CheckpointError(f"{source}: quantizer_type {quantizer_type!r} is not supported (need 'var_hybrid' or 'var')")
    if cfg.get("double_decoder", False):
        raise CheckpointError(f"{source}: double_decoder tokenizers (decoder2) are not supported")
    share = int(cfg.get("share_quant_resi", 4))
    # share_quant_resi: 0 = one phi per scale, 1 = a single shared phi, k > 1 = k partially shared.
    num_phi = share if share > 0 else int(cfg.get("default_qresi_counts", 0) or len(cfg["v_patch_nums"]))
    return dict(
        vocab_size=int(cfg["vocab_size"]), latent_channels=int(cfg["z_channels"]), base_channels=int(cfg["ch"]),
        channel_multipliers=tuple(int(m) for m in cfg["ch_mult"]), dropout=float(cfg.get("dropout", 0.0)),
        beta=float(cfg.get("beta", 0.25)), quant_conv_kernel_size=int(cfg.get("quant_conv_ks", 3)),
        phi_ratio=float(cfg.get("quant_resi", 0.5)), num_phi=num_phi, using_znorm=bool(cfg.get("using_znorm", False)),
        patch_nums=tuple(int(p) for p in cfg["v_patch_nums"]),
    )


_PHI_RENAMES = (
    (re.compile(r"^quantize\.quant_resi\.qresi_ls\.(\d+)\."), r"quantize.phi.\1."),  # partially shared
    (re.compile(r"^quantize\.quant_resi\.qresi\."), "quantize.phi.0."),  # fully shared
    (re.compile(r"^quantize\.quant_resi\.(\d+)\."), r"quantize.phi.\1."),  # one per scale
)


def official_tokenizer_state_dict(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official `vae.*` tokenizer keys -> `HybridTokenizer` keys (the `disc.*` discriminator is dropped)."""
    # HARTAutoEncoderWithDisc prefixes `vae.`; a bare HARTAutoEncoder save has no prefix.
    if any(k.startswith("vae.") for k in sd):
        sd = {k[len("vae."):]: v for k, v in sd.items() if k.startswith("vae.")}
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith("disc.")}
    out = {}
    for k, v in sd.items():
        for pattern, repl in _PHI_RENAMES:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no weights file ({' or '.join(WEIGHT_FILES)}) in {folder}")


def load_official_tokenizer(folder: PathLike, torch_dtype: torch.dtype = torch.float32) -> HybridTokenizer:
    """The official `tokenizer/` folder as a `HybridTokenizer` (eval mode, `torch_dtype`, CPU)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    kwargs = tokenizer_config_from_official(read_config(folder), folder / "config.json")
    weights = _weights_file(folder)
    model = empty_model(lambda: HybridTokenizer(**kwargs))
    load_checked(model, official_tokenizer_state_dict(read_weights(weights, torch_dtype)), weights,
                 OFFICIAL_TOKENIZER_TOLERATED)
    return model.eval()


# ---- transformer (official `llm/` folder) ------------------------------------------------------

# Buffers the reference saves but this package computes when needed.
TRANSFORMER_TOLERATED = (r"lvl_1L", r"attn_bias_for_masking", r"blocks\.\d+\.attn\.zero_k_bias")

# Official options whose other values change the architecture; this package implements the
# released variant only, and says so instead of loading the weights into the wrong network.
_RELEASED_VARIANT = {"attn_type": "llama", "mlp_type": "llama", "disable_aln": False, "use_timestep_embed": False,
                     "use_cross_attn": False, "sampler": "iddpm"}


def transformer_config_from_official(cfg: dict, state_dict: Dict[str, torch.Tensor], source: str) -> dict:
    """Map the official `llm/config.json` (plus sizes read off the weights) to HARTTransformer kwargs."""
    for key, released in _RELEASED_VARIANT.items():
        if cfg.get(key, released) != released:
            raise CheckpointError(f"{source}: {key}={cfg[key]!r} is not supported; this package implements the "
                                  f"released HART variant ({key}={released!r}).")
    for key in ("word_embed.weight", "head.weight"):
        if key not in state_dict:
            raise CheckpointError(f"{source}: key {key!r} is missing; is this a HART transformer checkpoint?")
    try:
        return dict(
            patch_nums=tuple(cfg["patch_nums"]), context_tokens=cfg["context_token"], context_dim=cfg["context_dim"],
            embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
            mlp_ratio=cfg.get("mlp_ratio", 4.0), vocab_size=state_dict["head.weight"].shape[0],
            latent_channels=state_dict["word_embed.weight"].shape[1], norm_eps=cfg.get("norm_eps", 1e-6),
            attn_l2_norm=cfg.get("attn_l2_norm", False), cond_pooling=cfg.get("sep_aln_pooling_mode", "max"),
            use_context_norm=cfg.get("use_context_norm", False), cond_drop_rate=cfg.get("cond_drop_rate", 0.1),
            diff_width=cfg.get("diff_width", 1024), diff_depth=cfg.get("diff_depth", 6),
            num_sampling_steps=str(cfg.get("num_sampling_steps", "8")),
            diffusion_batch_mul=cfg.get("diffusion_batch_mul", 4),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json has no {e.args[0]!r} field") from None


def official_transformer_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official transformer keys -> this package's (the diffusion head is `diffusion_head`)."""
    return {re.sub(r"^diffloss\.", "diffusion_head.", k): v for k, v in state_dict.items()}


def load_official_transformer(folder: PathLike, use_ema: bool = True, torch_dtype: torch.dtype = torch.float32
                              ) -> HARTTransformer:
    """Load an official `llm/` folder (eval mode, `torch_dtype`, CPU); `ema_model.bin` (EMA weights) replaces
    the weights when present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"transformer folder not found: {folder}")
    cfg = read_config(folder)
    weights_file = _weights_file(folder)
    ema_file = folder / "ema_model.bin"
    if use_ema and ema_file.is_file():
        weights_file = ema_file
    state_dict = read_weights(weights_file, torch_dtype)
    kwargs = transformer_config_from_official(cfg, state_dict, str(folder / "config.json"))
    model = empty_model(lambda: HARTTransformer(**kwargs))
    load_checked(model, official_transformer_state_dict(state_dict), str(weights_file), TRANSFORMER_TOLERATED)
    return model.eval()


# ---- text encoder and the whole release ---------------------------------------------------------

BUNDLED_NAME = "bundled"  # names the shapes-world model shipped inside the package (hart.bundled)


def resolve_folder(name_or_path: PathLike) -> Path:
    """A local folder as is; `bundled` (where no such local folder exists) the shipped shapes-world
    model; otherwise a hub repository name, downloaded (where the network allows)."""
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a model folder")
        return path
    if str(name_or_path) == BUNDLED_NAME:
        from hart.bundled import BUNDLED_MODEL

        return Path(BUNDLED_MODEL)
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/")):
        raise CheckpointError(f"model folder not found: {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path)))
    except Exception as e:  # offline mode, unknown repository, no network: one clear message
        raise CheckpointError(f"model folder {path} not found locally and could not be downloaded: {e}") from e


def load_text_encoder(name_or_path: PathLike, torch_dtype: torch.dtype = torch.float32):
    """(tokenizer, text model) from a Hugging Face folder or hub name.

    The tokenizer class named in `tokenizer_config.json` is honoured: transformers 5's AutoTokenizer
    picks the class from the model type (qwen2 -> Qwen2Tokenizer), which misreads other tokenizers.
    """
    import transformers
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_folder(name_or_path)
    named = read_config(folder, "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    fast = named.get("tokenizer_class") == "PreTrainedTokenizerFast"
    try:
        tokenizer = (transformers.PreTrainedTokenizerFast if fast else AutoTokenizer).from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError) as e:  # missing, truncated or mismatched files, in transformers' words
        raise CheckpointError(f"cannot load the text encoder in {folder}: {first_line(e)}") from e
    # Without tokenizer files, AutoTokenizer still builds an empty tokenizer that turns every prompt into
    # padding: the images would ignore the prompt without a word said
    if not tokenizer("a photo", add_special_tokens=False)["input_ids"]:
        raise CheckpointError(f"{folder} holds a text model but no usable tokenizer (tokenizer.json, or "
                              "vocab.json and merges.txt): every prompt would encode to nothing")
    return tokenizer, model.eval()


def load_official_components(path: PathLike, text_encoder: PathLike, tokenizer_path: PathLike = None,
                             use_ema: bool = True, torch_dtype: torch.dtype = torch.float32) -> dict:
    """The components of `HARTPipeline` from the official release layout, every model in `torch_dtype`.

    `path`: the release folder holding `llm/` and `tokenizer/` (or the `llm/` folder itself, with
    `tokenizer/` beside it); `tokenizer_path` overrides where the image tokenizer is.
    """
    path = resolve_folder(path)
    llm = path / "llm" if (path / "llm").is_dir() else path
    tokenizer_dir = Path(tokenizer_path) if tokenizer_path is not None else (
        path / "tokenizer" if (path / "llm").is_dir() else llm.parent / "tokenizer")
    if not (llm / "config.json").is_file():
        raise CheckpointError(f"{path} is not an official HART folder: no llm/config.json")
    text_tokenizer, text_model = load_text_encoder(text_encoder, torch_dtype)
    transformer = load_official_transformer(llm, use_ema=use_ema, torch_dtype=torch_dtype)
    check_text_encoder_width(text_model, transformer, text_encoder)
    return dict(
        tokenizer=text_tokenizer,
        text_encoder=text_model,
        transformer=transformer,
        vae=load_official_tokenizer(tokenizer_dir, torch_dtype),
    )


def check_text_encoder_width(text_model, transformer: HARTTransformer, source: PathLike) -> None:
    """Refuse, at load time, a text model whose hidden size is not the transformer's `context_dim`."""
    try:
        width = text_model.get_input_embeddings().embedding_dim
    except (AttributeError, NotImplementedError):  # not a standard transformers model: checked when encoding
        return
    if width != transformer.config.context_dim:
        raise CheckpointError(
            f"text encoder {source} has hidden size {width}, but the transformer expects context_dim "
            f"{transformer.config.context_dim}: use the text encoder this model was trained with"
        )


# ---- every layout: official, this package's (`model_index.json`), a training run folder ----------

RUN_MARKERS = ("run_info.json", "checkpoints")  # what `scripts/finetune.py` writes into --output_dir


def detect_layout(name_or_path: PathLike) -> Tuple[str, Path]:
    """`("pipeline", folder)` for this package's layout (a training run folder counts as its exported
    `pipeline/`), `("official", folder)` for the release's `llm/` + `tokenizer/` (or its `llm/` folder);
    anything else is a `CheckpointError` saying what the folder is and what to give instead."""
    path = resolve_folder(name_or_path)
    for folder in (path, path / "pipeline"):
        if (folder / "model_index.json").is_file():
            return "pipeline", folder
    config = read_config(path) if (path / "config.json").is_file() else None
    if (path / "llm" / "config.json").is_file() or config is not None and "_class_name" not in config:
        return "official", path
    if any((path / m).exists() for m in RUN_MARKERS):
        raise CheckpointError(f"{path} is a training run folder without an exported pipeline/ (the run has not "
                              "finished): continue it with --resume latest")
    what = "a single model folder, not a pipeline" if config is not None else "neither a hart pipeline folder"
    raise CheckpointError(f"{path} is {what}: give a folder holding model_index.json, a training run folder "
                          "(pipeline/model_index.json) or an official HART release folder (llm/ and tokenizer/)")


def safetensors_shapes(path: Path) -> Dict[str, tuple]:
    """Key -> shape of a `.safetensors` file, from its header (checks the file is complete, reads no data)."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError (truncated, corrupt), OSError: one message
        raise CheckpointError(f"cannot read weights file {path} (truncated or corrupt?): {e}") from e


def check_model_folder(cls, folder: Path) -> None:
    """Refuse, before loading, a diffusers-format folder (`config.json` + `diffusion_pytorch_model.safetensors`)
    whose config does not build `cls` or whose weights do not fit the model that config describes."""
    config = read_config(folder)
    shapes = safetensors_shapes(folder / DIFFUSERS_WEIGHTS)
    try:
        with torch.device("meta"):  # sizes only: no memory, no initialisation
            model = cls.from_config(config)
    except Exception as e:  # a hand-edited config can fail anywhere in the constructor
        raise CheckpointError(f"{folder / 'config.json'} does not describe a {cls.__name__}: "
                              f"{type(e).__name__}: {e}") from e
    problems = fit_problems({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes)
    if problems:
        raise CheckpointError(f"checkpoint {folder / DIFFUSERS_WEIGHTS} does not fit the {cls.__name__} that "
                              f"{folder / 'config.json'} describes: {problems}")


def check_pipeline_folder(folder: Path) -> None:
    """Refuse, before diffusers reads anything, a pipeline folder whose models or weights do not fit."""
    for name, cls in (("transformer", HARTTransformer), ("vae", HybridTokenizer)):
        check_model_folder(cls, folder / name)
    for weights in sorted((folder / "text_encoder").glob("*.safetensors")):
        safetensors_shapes(weights)


def load_image_tokenizer(name_or_path: PathLike) -> HybridTokenizer:
    """A `HybridTokenizer` from a pipeline's `vae/`, a training run (`pipeline/vae`, `tokenizer/`), a
    `HybridTokenizer` folder, or the official tokenizer folder (or the release folder holding it)."""
    path = resolve_folder(name_or_path)
    if (path / "model_index.json").is_file() or (path / "pipeline" / "model_index.json").is_file():
        path = detect_layout(path)[1] / "vae"
    elif (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if read_config(path).get("_class_name") != HybridTokenizer.__name__:
        return load_official_tokenizer(path)
    check_model_folder(HybridTokenizer, path)
    try:
        return HybridTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {first_line(e)}") from e
