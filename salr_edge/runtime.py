"""Find and register the com.salr custom-op library, make ONNX Runtime sessions, generate text.

onnxruntime is imported lazily so that `import salr_edge` stays lean.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

LIBRARY_ENV = "SALR_OPS_LIBRARY"
_LIBRARY_NAME = "libsalr_ops.so"


def library_path() -> str:
    """Return the path of the built custom-op library `libsalr_ops.so`.

    Resolution order: `$SALR_OPS_LIBRARY` (a developer build), then the copy installed inside the
    package (`salr_edge/lib/`, put there by `pip install`).

    Raises:
        FileNotFoundError: no built library was found; the message says how to build it.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"{LIBRARY_ENV}={override} does not exist")
        return str(Path(override).resolve())
    candidates = [Path(__file__).resolve().parent / "lib" / _LIBRARY_NAME]
    try:  # editable installs (scikit-build-core redirect mode) keep the built file elsewhere
        from importlib.resources import files

        candidates.append(Path(str(files("salr_edge") / "lib" / _LIBRARY_NAME)))
    except (ModuleNotFoundError, TypeError):
        pass
    for path in candidates:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"the custom-op library {_LIBRARY_NAME} is not built: reinstall with `pip install -e .` "
        f"(it builds custom_ops/ with CMake) or set {LIBRARY_ENV} to a built copy"
    )


# ---- sessions --------------------------------------------------------------------------------------
SALR_DOMAIN = "com.salr"  # == salr_edge.export.ops_schema.SALR_DOMAIN (a test checks), kept here so the
# runtime needs neither torch nor the exporter.
DISABLE_OPTIMIZERS_KEY = "optimization.disable_specified_optimizers"


class LibraryRequiredError(RuntimeError):
    """The model needs the com.salr custom-op library and it is not available."""


def model_salr_info(model_path: str | os.PathLike) -> tuple[bool, bool]:
    """(uses com.salr ops, carries their model-local function bodies), read without the weights."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    uses = any(node.domain == SALR_DOMAIN for node in proto.graph.node)
    has_functions = any(f.domain == SALR_DOMAIN for f in proto.functions)
    return uses, has_functions


def _find_library(model_path: Path) -> str | None:
    """The built library (`library_path()`), else the copy the exporter put next to the model."""
    try:
        return library_path()
    except FileNotFoundError:
        beside = model_path.resolve().parent / _LIBRARY_NAME
        return str(beside) if beside.is_file() else None


def make_session(model_path: str | os.PathLike, providers: list | None = None, threads: int | None = None,
                 use_library: bool | None = None, profile_prefix: str | None = None):
    """An ONNX Runtime session for an exported model, with the com.salr library when it is needed.

    Args:
        model_path: the `.onnx` file.
        providers: ORT execution providers (default: CPU).
        threads: intra-op threads (default: ORT's choice).
        use_library: True: register the library (error if it is missing); False: never (the model's
            function bodies run instead); None: register it when the model uses com.salr ops and a
            library is found, else fall back to the function bodies.
        profile_prefix: turn on ORT profiling, writing the trace to `<prefix>_<time>.json`
            (`session.end_profiling()` returns its path).

    Returns:
        An `onnxruntime.InferenceSession`.

    Raises:
        FileNotFoundError: no model at `model_path`.
        LibraryRequiredError: the library is required (asked for, or the model has com.salr nodes
            without function bodies) but was not found.

    Without the library, ORT inlines the function bodies; its ConstantFolding pass would then decode
    every weight into a dense fp32 initializer at load time (the compact weights gone), so it is
    disabled for such sessions (session config entry `optimization.disable_specified_optimizers`,
    checked on ORT 1.32; the `disabled_optimizers=` keyword of `InferenceSession` does the same).
    """
    import onnxruntime as ort

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"ONNX model {model_path} does not exist")
    uses_salr, has_functions = model_salr_info(model_path)
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    library = None
    if use_library is not False and uses_salr:
        library = _find_library(model_path)
        if library is None and (use_library or not has_functions):
            reason = "use_library=True" if use_library else "the model has com.salr nodes and no function bodies"
            raise LibraryRequiredError(
                f"{model_path} needs the custom-op library ({reason}) and none was found: build it "
                f"(pip install -e .) or set {LIBRARY_ENV} to a built {_LIBRARY_NAME}")
    if use_library is False and uses_salr and not has_functions:
        raise LibraryRequiredError(f"{model_path} has com.salr nodes without function bodies; it cannot run "
                                   "without the custom-op library")
    if library is not None:
        so.register_custom_ops_library(library)
        logger.info("registered %s for %s", library, model_path.name)
    elif uses_salr:
        so.add_session_config_entry(DISABLE_OPTIMIZERS_KEY, "ConstantFolding")
        logger.info("running %s through its com.salr function bodies (no library); ConstantFolding disabled",
                    model_path.name)
    return ort.InferenceSession(str(model_path), so, providers=providers or ["CPUExecutionProvider"])


# ---- generation ------------------------------------------------------------------------------------
_ORT_FLOAT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def _past_inputs(session) -> list[tuple[str, tuple, str]]:
    """(name, [kv_heads, head_dim] trailing dims, numpy dtype) of every past input, in order."""
    pasts = []
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            shape = inp.shape
            if not isinstance(shape[1], int) or not isinstance(shape[3], int):
                raise ValueError(f"past input {inp.name} has no static head dims: {shape}")
            pasts.append((inp.name, (shape[1], shape[3]), _ORT_FLOAT_TYPES[inp.type]))
    return pasts


def _sample(logits, rng, temperature: float, top_k: int, top_p: float):
    """One token id per row from logits (B, V) with temperature, top-k and nucleus filtering."""
    import numpy as np

    logits = logits.astype(np.float64) / max(temperature, 1e-6)  # (B, V)
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def generate(session_or_path, tokenizer=None, prompt: str | None = None, input_ids=None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, eos_token_id: int | list[int] | None = None):
    """Generate tokens with an exported decoder, the KV cache carried through ONNX Runtime.

    The prompt runs once (past length 0), then one token per step with the previous step's
    ``present.*`` fed back as ``past_key_values.*``.

    Args:
        session_or_path: an `InferenceSession` or the `.onnx` path (a session is made with `make_session`).
        tokenizer: encodes `prompt`; its `eos_token_id` is the default stop token.
        prompt: text to continue (needs `tokenizer`).
        input_ids: instead of `prompt`, token ids: a list or a [batch, seq] array (no padding).
        max_new_tokens: tokens to generate at most.
        do_sample: sample instead of greedy argmax.
        temperature, top_k, top_p: sampling filters (top_k 0 and top_p 1.0 disable them).
        seed: seed of the sampler's generator.
        eos_token_id: stop token(s); default the tokenizer's. A row that has stopped repeats it.

    Returns:
        int64 array [batch, seq + generated]: the prompt followed by the new tokens, like
        transformers' `generate`.
    """
    import numpy as np

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if (prompt is None) == (input_ids is None):
        raise ValueError("give exactly one of prompt and input_ids")
    if prompt is not None:
        if tokenizer is None:
            raise ValueError("a prompt needs a tokenizer")
        input_ids = tokenizer(prompt, return_tensors="np")["input_ids"]
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] array, got shape {ids.shape}")
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    eos = [] if eos_token_id is None else [int(t) for t in np.atleast_1d(eos_token_id)]
    session = make_session(session_or_path) if isinstance(session_or_path, (str, os.PathLike)) else session_or_path
    pasts = _past_inputs(session)
    rng = np.random.default_rng(seed)

    batch = ids.shape[0]
    feeds = {name: np.zeros((batch, heads, 0, head_dim), dtype=dtype) for name, (heads, head_dim), dtype in pasts}
    step_ids, past_len = ids, 0
    sequences = ids
    finished = np.zeros(batch, dtype=bool)
    output_names = [o.name for o in session.get_outputs()]
    for _ in range(max_new_tokens):
        seq_len = step_ids.shape[1]
        feeds["input_ids"] = step_ids  # (B, S)
        feeds["attention_mask"] = np.ones((batch, past_len + seq_len), dtype=np.int64)  # (B, P+S)
        feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq_len, dtype=np.int64),
                                                (batch, seq_len)).copy()  # (B, S)
        outputs = dict(zip(output_names, session.run(None, feeds), strict=True))
        logits = outputs["logits"][:, -1, :]  # (B, V)
        if do_sample:
            next_ids = _sample(logits, rng, temperature, top_k, top_p)
        else:
            next_ids = logits.argmax(axis=-1).astype(np.int64)
        if eos:
            next_ids = np.where(finished, eos[0], next_ids)  # transformers pads finished rows with eos[0]
            finished |= np.isin(next_ids, eos)
        sequences = np.concatenate([sequences, next_ids[:, None]], axis=1)
        if eos and finished.all():
            break
        for name, _, _ in pasts:
            feeds[name] = outputs[name.replace("past_key_values.", "present.")]
        past_len += seq_len
        step_ids = next_ids[:, None]
    return sequences


# ---- command line (`salr generate`) ---------------------------------------------------------------
def add_generate_arguments(parser) -> None:
    """Add the `generate` options to an argparse parser."""
    parser.add_argument("model", help="exported ONNX model (MODEL.onnx)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: the model's folder, where salr-export saves it)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0: no nucleus filter")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    library = parser.add_mutually_exclusive_group()
    library.add_argument("--library", dest="use_library", action="store_true", default=None,
                         help="require the com.salr custom-op library")
    library.add_argument("--no-library", dest="use_library", action="store_false",
                         help="run the com.salr function bodies instead of the library")


def generate_main(args) -> int:
    """Run `salr generate` from parsed arguments: the continuation goes to stdout."""
    import sys

    from transformers import AutoTokenizer

    model_path = Path(args.model)
    if not model_path.is_file():
        raise FileNotFoundError(f"ONNX model {model_path} does not exist")
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else model_path.resolve().parent
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no tokenizer in {tokenizer_dir} (give --tokenizer DIR): {exc}") from exc
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    session = make_session(model_path, threads=args.threads, use_library=args.use_library)
    ids = tokenizer(prompt, return_tensors="np", add_special_tokens=not args.chat)["input_ids"]
    sequences = generate(session, tokenizer, input_ids=ids, max_new_tokens=args.max_new_tokens,
                         do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed)
    sys.stdout.write(tokenizer.decode(sequences[0, ids.shape[1]:], skip_special_tokens=True) + "\n")
    return 0
