"""Records with images or audio → the model's own inputs, through its processor: image classification
(``image`` + ``label``), audio classification (``audio`` + ``label``) and speech recognition (``audio`` +
``text``: Whisper-style encoder-decoders and CTC models such as wav2vec2).

Memory: the prepared examples hold each record's image or audio as it was given — the object already in memory
(a PIL image, an array, a tensor, a datasets ``Audio`` dict) or a file path — and never decoded pixels or audio
features. Files are checked when the data is prepared (an image file's header and integrity with PIL's
``verify``, a sound file's header: its rate, channels and length) so that a bad record stops the run before step
1, with its index; the pixels and samples are read, and the processor run, batch by batch in the collator. One
processed image (3×224×224 float32) is 600 KB and Whisper's features of one clip (80×3000 float32) almost 1 MB
whatever the clip's length: held for 10,000 records that is 6 to 10 GB, where decoding a batch per step costs a
few milliseconds of CPU. Audio given as arrays is kept as one float32 mono array per record (the user's own
float32 arrays are not copied).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import operator
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import UsageError, close_matches
from .formats import IGNORE_INDEX, LABEL_COLUMNS
from .labels import label_ids
from .prepared import PreparedData, eval_count, split_eval
from .processors import feature_extractor, image_processor, text_tokenizer
from .sources import load_source
from .trace import DataTrace, Skipped

__all__ = [
    "AUDIO_COLUMNS",
    "IMAGE_COLUMNS",
    "TRANSCRIPT_COLUMNS",
    "UNITS",
    "MediaCollator",
    "check_processor_fits",
    "describe_media",
    "media_inputs",
    "prepare_media",
]

# Column names looked for, in this order, when the image_column / audio_column / text_column setting is not set.
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture", "photo", "image_path", "img_path", "file", "path")
AUDIO_COLUMNS = ("audio", "speech", "wav", "sound", "audio_path", "file", "path")
TRANSCRIPT_COLUMNS = ("text", "sentence", "transcript", "transcription", "normalized_text")
_RATE_COLUMNS = ("sampling_rate", "sample_rate", "sr")

# What one unit of throughput is, per task (PreparedData.unit).
UNITS = {"IMAGE_CLS": "images", "AUDIO_CLS": "seconds of audio", "ASR": "seconds of audio"}


class _Media(NamedTuple):
    """One record's image or audio as training holds it: ``value`` (the given object, a path, or a float32 mono
    array), the audio's ``rate``, and what the summaries show: ``seconds`` of audio, or the image's ``size``."""

    value: Any
    rate: int | None = None
    seconds: float | None = None
    size: tuple[int, int] | None = None


# ------------------------------------------------------------------------------------------------ preparing


def prepare_media(
    data: Any,
    processor: Any,
    *,
    task: str,
    seq: int = 512,
    eval: Any = None,
    eval_data: Any = None,
    seed: int = 0,
    label2id: Any = None,
    text_column: str | None = None,
    label_column: str | None = None,
    image_column: str | None = None,
    audio_column: str | None = None,
    vocab_size: int | None = None,
    decoder_start_token_id: int | None = None,
    trace: DataTrace | None = None,
    **ignored: Any,
) -> PreparedData:
    """``data`` (records with an image or audio column and a label, or for ASR a transcript) as examples for
    ``task`` ("IMAGE_CLS", "AUDIO_CLS", "ASR"), with the collator that makes their batches through ``processor``.

    Images: a PIL image, a numpy array (H×W, H×W×C or C×H×W; uint8, or floats in [0, 1]), a torch tensor, a file
    path, or a datasets ``Image`` dict (``bytes``/``path``). Audio: a datasets ``Audio`` dict (``array`` +
    ``sampling_rate``, or ``path``/``bytes``), a 1-D array with a ``sampling_rate`` column (without one it is taken
    to be at the feature extractor's rate), or a sound file path (.wav with the standard library; other formats
    with soundfile when installed). Audio at another rate than the feature extractor's is refused, naming the
    record. ASR transcripts are tokenized here and cut to ``seq`` tokens; ``decoder_start_token_id`` (an
    encoder-decoder's) is taken off their front, since the model shifts the labels right and puts it there itself
    (``WhisperForConditionalGeneration.forward``), and the tokenizer's end-of-text token is added when missing, so
    that the model learns where a transcript ends.
    """
    _check_processor(processor, task)
    wrong = ("audio_column", audio_column) if task == "IMAGE_CLS" else ("image_column", image_column)
    if wrong[1] is not None:
        right, kind = ("image_column", "image") if task == "IMAGE_CLS" else ("audio_column", "audio")
        raise UsageError(
            f"`{wrong[0]}`={wrong[1]!r} is for {wrong[0].split('_')[0]} records; this is {task.lower()} data: set "
            f"{right} to name the column holding the {kind}."
        )
    if packing := ignored.get("packing"):
        raise UsageError(f"`packing`={packing!r} is for causal LM text; set packing=False for task {task}.")
    if task == "ASR" and label_column is not None:
        raise UsageError(
            f"`label_column`={label_column!r} is for classifiers; speech recognition learns the `text` column "
            "(set text_column= to use another one)."
        )
    sources = [("data", data)] + ([("eval_data", eval_data)] if eval_data is not None else [])
    if eval_data is not None and not (
        eval is None or eval is True or (isinstance(eval, str) and eval.strip().lower() == "auto")
    ):
        raise UsageError(
            f"`eval`={eval!r} and `eval_data` are both given: pass eval_data for a separate eval set, or eval= "
            "to hold out part of data — not both."
        )
    found: dict[str, list[dict]] = {}
    class_names = None
    for what, value in sources:
        source = load_source(value, what)
        if trace is not None:
            trace.records[what] = len(source.items)
        skipped = trace.skipped.setdefault(what, []) if trace is not None else []
        found[what], names = _examples(
            source, what, task, processor, text_column, label_column, image_column, audio_column, skipped
        )
        class_names = class_names or names
    train_ex, eval_ex = found["data"], found.get("eval_data")

    label_names: tuple[str, ...] = ()
    truncated = 0
    if task == "ASR":
        tokenizer = text_tokenizer(processor)
        for ex in train_ex + (eval_ex or []):
            truncated += _tokenize_transcript(ex, tokenizer, seq, decoder_start_token_id, vocab_size)
    else:
        everything = train_ex + (eval_ex or [])
        ids, label_names = label_ids([ex["label"] for ex in everything], label2id, class_names)
        for ex, i in zip(everything, ids, strict=True):
            ex["label"] = i
    if eval_ex is None:
        train_ex, eval_ex = split_eval(train_ex, eval_count(eval, len(train_ex)), seed)
    if trace is not None:
        trace.origins["train"] = [ex["record"] for ex in train_ex]
        trace.origins["eval"] = [ex["record"] for ex in eval_ex or []]
    unit = UNITS[task]
    return PreparedData(
        task=task,
        train=train_ex,
        eval=eval_ex or None,
        label_names=tuple(label_names),
        train_tokens=sum(len(ex["labels"]) for ex in train_ex) if task == "ASR" else 0,
        truncated=truncated,
        pad_token_id=IGNORE_INDEX,
        seq=seq,
        collator=MediaCollator(task, processor),
        unit=unit,
        train_units=float(len(train_ex)) if unit == "images" else sum(ex["seconds"] for ex in train_ex),
    )


def _check_processor(processor: Any, task: str) -> None:
    need = "an image processor" if task == "IMAGE_CLS" else "an audio feature extractor"
    part = image_processor(processor) if task == "IMAGE_CLS" else feature_extractor(processor)
    if part is None:
        raise UsageError(
            f"Task {task} needs the model's processor ({need}); got "
            f"{'none' if processor is None else type(processor).__name__}. Pass processor="
            f"{'AutoImageProcessor' if task == 'IMAGE_CLS' else 'AutoProcessor'}.from_pretrained(<the model's name "
            "or folder>) (in %%lora train: `processor: VAR`)."
        )
    if task == "ASR" and text_tokenizer(processor) is None:
        raise UsageError(
            f"Speech recognition needs a processor that holds a tokenizer for the transcripts (e.g. "
            f"WhisperProcessor, Wav2Vec2Processor); got {type(processor).__name__}, a feature extractor alone. Pass "
            "processor=AutoProcessor.from_pretrained(<the model's name or folder>)."
        )


def check_processor_fits(model: Any, processor: Any, task: str) -> None:
    """The processor makes inputs of the shape ``model`` takes: the image size of a model whose position embeddings
    are learned for one size (ViT, DeiT: ``interpolate_pos_encoding`` is off in training), the mel bins of an
    audio model's spectrogram features (Whisper, AST, Speech2Text), and a Whisper encoder's window length. A
    processor made for another checkpoint is refused here in one line, naming both values, rather than by a shape
    error inside the model at the first step."""
    config = getattr(model, "config", None)
    if config is None or processor is None:
        return
    name = type(model).__name__
    if task == "IMAGE_CLS":
        part = image_processor(processor)
        size = getattr(config, "image_size", None)
        if part is None or not isinstance(size, int):
            return
        try:
            fixed = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            fixed = False
        if not fixed or not any(n.endswith("position_embeddings") for n, _ in model.named_parameters()):
            return  # convolutional, or position embeddings interpolated to any size: every image size works
        from PIL import Image

        try:
            made = part(Image.new("RGB", (size, size)), return_tensors="pt")["pixel_values"].shape[-2:]
        except Exception:  # a processor that cannot say: the first batch will
            return
        if tuple(made) != (size, size):
            raise UsageError(
                f"The image processor makes {made[0]}×{made[1]} images and this model ({name}) takes {size}×{size} "
                f"(config.image_size): pass the processor saved with this model, or one made with size="
                f"{{'height': {size}, 'width': {size}}}."
            )
        return
    extractor = feature_extractor(processor)
    if extractor is None:
        return
    wants = getattr(config, "num_mel_bins", None) or getattr(config, "input_feat_per_channel", None)
    gives = getattr(extractor, "num_mel_bins", None) or getattr(extractor, "feature_size", None)
    if isinstance(wants, int) and isinstance(gives, int) and gives > 1 and wants != gives:
        raise UsageError(
            f"The feature extractor makes {gives} mel bins and this model ({name}) takes {wants} "
            f"(config.num_mel_bins): pass the processor saved with this model, or one made with feature_size="
            f"{wants}."
        )
    frames, positions = (
        getattr(extractor, "nb_max_frames", None),
        getattr(config, "max_source_positions", None),
    )
    whisper = getattr(config, "model_type", None) == "whisper"
    if whisper and isinstance(frames, int) and isinstance(positions, int) and frames != 2 * positions:
        # the encoder's two convolutions halve the frames to its positions
        raise UsageError(
            f"The feature extractor makes {frames} frames a clip and this model ({name}) takes {2 * positions} "
            "(2 × config.max_source_positions): pass the processor saved with this model."
        )


def _pick_column(columns: list[str], given: str | None, setting: str, candidates: tuple[str, ...], what: str,
                 kind: str) -> str:  # fmt: skip
    """The column ``setting`` names, else the first of ``candidates`` the records have; a UsageError with the
    columns there are and the closest match otherwise."""
    shown = ", ".join(columns)
    if given is not None:
        if given not in columns:
            raise UsageError(
                f"`{setting}`={given!r} is not a column of `{what}` (columns: {shown}).{_closest(given, columns)}"
            )
        return given
    for name in candidates:
        if name in columns:
            return name
    guess = next((c for c in columns for m in close_matches(c, candidates, n=1) if m), None)
    hint = f" (`{guess}`?)" if guess else ""
    raise UsageError(
        f"`{what}` has no `{candidates[0]}` column for the {kind}; columns: {shown} — set {setting}: NAME{hint} "
        f"(looked for {', '.join(candidates)})."
    )


def _closest(word: str, columns: list[str]) -> str:
    matches = close_matches(word, columns, n=1)
    return f" Did you mean `{matches[0]}`?" if matches else ""


def _examples(
    source: Any,
    what: str,
    task: str,
    processor: Any,
    text_column: str | None,
    label_column: str | None,
    image_column: str | None,
    audio_column: str | None,
    skipped: list[Skipped],
) -> tuple[list[dict], tuple[str, ...] | None]:
    items = source.items
    kind = "images" if task == "IMAGE_CLS" else "audio"
    if not isinstance(items[0], Mapping):
        target = "label" if task != "ASR" else "text"
        raise UsageError(
            f"`{what}` is a list of {type(items[0]).__name__}; task {task} needs records with the {kind} and a "
            f"`{target}`, e.g. [{{'{'image' if task == 'IMAGE_CLS' else 'audio'}': ..., '{target}': ...}}]."
        )
    columns = list(dict.fromkeys(str(k) for item in items for k in item))
    if task == "IMAGE_CLS":
        media_col = _pick_column(columns, image_column, "image_column", IMAGE_COLUMNS, what, "images")
    else:
        media_col = _pick_column(columns, audio_column, "audio_column", AUDIO_COLUMNS, what, "audio")
    if task == "ASR":
        target_col = _pick_column(
            columns, text_column, "text_column", TRANSCRIPT_COLUMNS, what, "transcripts"
        )
    else:
        others = tuple(c for c in LABEL_COLUMNS if c != media_col)
        target_col = _pick_column(columns, label_column, "label_column", others, what, "class labels")
    rate_col = next((c for c in _RATE_COLUMNS if c in columns), None)
    expected = None if task == "IMAGE_CLS" else int(feature_extractor(processor).sampling_rate)
    limit = getattr(feature_extractor(processor), "n_samples", None) if task == "ASR" else None

    examples = []
    for i, item in enumerate(items):
        where = f"`{what}[{i}]`"
        value = item.get(media_col)
        if _missing(value):
            raise UsageError(f"{where} has no `{media_col}`; every record needs its {kind}.")
        if task == "IMAGE_CLS":
            media = check_image(value, where)
        else:
            media = check_audio(value, item.get(rate_col) if rate_col else None, expected, where)
            if limit and media.seconds * expected > limit:
                raise UsageError(
                    f"{where} is {media.seconds:.1f} s long and this feature extractor reads the first "
                    f"{limit / expected:.0f} s only: the model would learn words it never hears. Cut the audio "
                    "into pieces of at most that length, each with its own transcript."
                )
        target = item.get(target_col)
        if task == "ASR":
            if _missing(target) or not isinstance(target, str):
                raise UsageError(f"{where} has no transcript in `{target_col}` (got {target!r:.40}).")
            if not target.strip():
                skipped.append(Skipped(i, f"empty `{target_col}`"))
                continue
        elif _missing(target) or (isinstance(target, str) and not target.strip()):
            raise UsageError(f"{where} has no `{target_col}`; every {task} record needs a class label.")
        example = {"source": what, "record": i, "media": media.value, "rate": media.rate,
                   "seconds": media.seconds, "size": media.size}  # fmt: skip
        example["text" if task == "ASR" else "label"] = target
        examples.append(example)
    if not examples:
        raise UsageError(f"`{what}` has only empty transcripts: give at least one record with text.")
    feature = None
    with contextlib.suppress(KeyError, TypeError, IndexError):
        feature = source.features[target_col] if source.features is not None else None
    names = getattr(feature, "names", None)
    return examples, (tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else None)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _tokenize_transcript(
    example: dict, tokenizer: Any, seq: int, decoder_start: int | None, vocab_size: int | None
) -> int:
    """Set ``example["labels"]`` to the transcript's token ids; returns 1 when ``seq`` cut it."""
    ids = list(tokenizer(example.pop("text"))["input_ids"])
    if decoder_start is not None:
        if ids and ids[0] == decoder_start:
            ids = ids[1:]
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
    cut = len(ids) > seq
    ids = ids[:seq]
    if vocab_size is not None:
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise UsageError(
                f"`{example['source']}[{example['record']}]`: the tokenizer gives token id {bad}, outside the "
                f"model's {vocab_size} token ids: this processor's tokenizer is not the model's."
            )
    example["labels"] = ids
    return int(cut)


# ------------------------------------------------------------------------------------------------ images


def check_image(value: Any, where: str) -> _Media:
    """``value`` as training holds it, with its size (width, height); files are opened and verified (not kept
    decoded). A UsageError names the record and why when it is not an image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return _Media(value, size=value.size)
    if isinstance(value, (str, os.PathLike, bytes, bytearray)) or _is_image_dict(value):
        with _open_image(value, where) as image:
            size = image.size
            try:
                image.verify()
            except Exception as exc:
                raise UsageError(f"{where}: the image {_name(value)} cannot be decoded ({exc}).") from None
        return _Media(value, size=size)
    array = _image_array(value, where)
    return _Media(value, size=(int(array.shape[1]), int(array.shape[0])))


def _is_image_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and ("bytes" in value or "path" in value)


def _name(value: Any) -> str:
    """How a message names a file: its path (or for bytes given as a datasets dict, the ``path`` it names — an
    uploaded file's name), else "(bytes)"."""
    if isinstance(value, Mapping):
        value = value.get("path") or "(bytes)"
    return repr(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else "(bytes)"


# The first bytes of the file formats a message can name: images given to an audio model and sound given to an
# image model are told apart from a damaged file, and only real sound formats get the advice to install soundfile.
_IMAGE_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))  # fmt: skip
_SOUND_MAGIC = ((b"fLaC", "FLAC"), (b"OggS", "OGG"), (b"ID3", "MP3"), (b"\xff\xfb", "MP3"), (b"\xff\xf3", "MP3"),
                (b"\xff\xf2", "MP3"), (b"FORM", "AIFF"))  # fmt: skip


def _file_kind(head: bytes) -> tuple[str, str] | None:
    """("image" | "sound", format) of a file from its first 12 bytes, or None when it is neither kind known."""
    if head[:4] == b"RIFF":  # a WAV file (or a damaged one, said as such), unless it holds a WEBP image
        return ("image", "WEBP") if head[8:12] == b"WEBP" else ("sound", "WAV")
    for magic, kind in _IMAGE_MAGIC:
        if head.startswith(magic):
            return "image", kind
    for magic, kind in _SOUND_MAGIC:
        if head.startswith(magic):
            return "sound", kind
    return None


def _head(value: Any) -> bytes:
    """The first 12 bytes of a file given as bytes or a path (b"" when it cannot be read)."""
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[:12])
    try:
        with open(value, "rb") as f:
            return f.read(12)
    except (OSError, TypeError, ValueError):
        return b""


def _open_image(value: Any, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    name = _name(value)
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        source = io.BytesIO(value)
    elif not os.path.isfile(value):
        raise UsageError(
            f"{where}: image file not found: {os.fspath(value)!r} (relative paths start at {os.getcwd()})."
        )
    else:
        source = value
    try:
        return Image.open(source)
    except UnidentifiedImageError:
        kind = _file_kind(_head(value))
        if kind is not None and kind[0] == "sound":
            raise UsageError(
                f"{where}: {name} is a sound file ({kind[1]}), not an image: this model reads images."
            ) from None
        raise UsageError(f"{where}: {name} is not an image file PIL can read.") from None
    except OSError as exc:
        raise UsageError(f"{where}: the image {name} cannot be read ({exc}).") from None


def _image_array(value: Any, where: str) -> np.ndarray:
    """An image given as an array or tensor, as H×W×C (or H×W) numpy."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except Exception:
        array = None
    if array is None or array.dtype == object or array.ndim not in (2, 3) or array.size == 0:
        shape = getattr(array, "shape", None)
        raise UsageError(
            f"{where}: {type(value).__name__}{f' of shape {shape}' if shape else ''} is not an image; give a PIL "
            "image, an array H×W×C (or C×H×W, H×W), a tensor or a file path."
        )
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # C×H×W → H×W×C
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        raise UsageError(
            f"{where}: an image array of shape {array.shape} has no channel axis of 1, 3 or 4 values."
        )
    if array.dtype.kind == "f" and array.size and np.nanmin(array) < 0:
        # floats are read as [0, 1] (or 0-255) pixel values; scaling negatives would clip them all to black
        raise UsageError(
            f"{where}: the image's values run from {np.nanmin(array):.2f} to {np.nanmax(array):.2f}; a float image "
            "must be in [0, 1] (or 0-255) — give uint8 pixels, or floats in [0, 1] (for an image normalised to "
            "-1..1: (x + 1) / 2). The processor normalises it for the model itself."
        )
    return array


def load_image(example: dict) -> Any:
    """The example's image decoded, as an RGB PIL image (what image processors take in every version)."""
    from PIL import Image

    value, where = example["media"], f"`{example['source']}[{example['record']}]`"
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, (str, os.PathLike, bytes, bytearray)) or _is_image_dict(value):
        with _open_image(value, where) as image:
            try:
                return image.convert("RGB")
            except Exception as exc:
                raise UsageError(f"{where}: the image {_name(value)} cannot be decoded ({exc}).") from None
    array = _image_array(value, where)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if np.nanmax(array) <= 1.0:  # floats in [0, 1]; whole numbers are taken as 0-255
            array = array * 255.0
        array = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


# ------------------------------------------------------------------------------------------------ audio


def check_audio(value: Any, rate: Any, expected: int, where: str) -> _Media:
    """``value`` as training holds it: a float32 mono array, or a file path (its header read, the samples read
    per batch). The sampling rate must be ``expected`` (the feature extractor's)."""
    if isinstance(value, Mapping) and value.get("array") is not None:
        rate = value.get("sampling_rate", rate)
        value = value["array"]
    elif isinstance(value, Mapping) and (value.get("path") or value.get("bytes")):
        value = {"bytes": value.get("bytes"), "path": value.get("path")}  # a file: kept with its name
    elif hasattr(value, "get_all_samples"):  # datasets >= 4 decodes audio to a torchcodec AudioDecoder
        try:
            samples = value.get_all_samples()
        except Exception as exc:
            raise UsageError(f"{where}: the audio cannot be decoded ({exc}).") from None
        value, rate = samples.data, samples.sample_rate
    if isinstance(value, (str, os.PathLike, bytes, bytearray, Mapping)):
        file_rate, frames = _sound_header(value, where)
        _check_rate(file_rate, expected, where)
        return _Media(value, rate=file_rate, seconds=frames / file_rate)
    samples = _mono(value, where)
    if rate is not None:
        try:
            rate = operator.index(rate) if not isinstance(rate, float) else int(rate)
        except TypeError:
            raise UsageError(
                f"{where}: the sampling rate {rate!r} is not a number of samples a second."
            ) from None
    rate = expected if rate is None else rate
    _check_rate(rate, expected, where)
    return _Media(samples, rate=rate, seconds=len(samples) / rate)


def _check_rate(rate: int, expected: int, where: str) -> None:
    if rate != expected:
        # Resampling well needs a polyphase or windowed-sinc filter (librosa, torchaudio, soxr), none of which is a
        # dependency here; a plain interpolation would alias, so the user resamples with one of those.
        raise UsageError(
            f"{where}: the audio is sampled at {rate} Hz and the model's feature extractor expects {expected} Hz. "
            f"Resample it first: datasets' ds.cast_column('audio', Audio(sampling_rate={expected})), or "
            f"librosa.resample(array, orig_sr={rate}, target_sr={expected})."
        )


def _mono(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    try:
        array = np.asarray(value)
    except Exception:
        array = None
    if array is None or array.dtype.kind not in "fiu" or array.ndim not in (1, 2) or array.size == 0:
        shape = getattr(array, "shape", None)
        raise UsageError(
            f"{where}: {type(value).__name__}{f' of shape {shape}' if shape else ''} is not audio; give a 1-D "
            "array of samples (with a `sampling_rate` column), a datasets Audio dict {'array', 'sampling_rate'} "
            "or a .wav file path."
        )
    if array.dtype.kind in "iu":  # PCM integers → [-1, 1]
        info = np.iinfo(array.dtype)
        array = (array.astype(np.float32) - (info.max + 1 + info.min) / 2) / ((info.max - info.min + 1) / 2)
    if array.ndim == 2:  # channels: mix down to mono (the channel axis is the short one)
        array = array.mean(axis=0 if array.shape[0] <= array.shape[1] else 1)
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise UsageError(f"{where}: the audio holds NaN or infinite samples.")
    return array


def _sound_header(value: Any, where: str) -> tuple[int, int]:
    """(sampling rate, frames) of a sound file, from its header."""
    with _open_sound(value, where) as sound:
        return sound.rate, sound.frames


class _Sound(NamedTuple):
    rate: int
    frames: int
    read: Any  # () -> float32 mono samples

    def __enter__(self) -> _Sound:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _open_sound(value: Any, where: str) -> _Sound:
    name = _name(value)
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else os.fspath(value)
    if isinstance(source, str) and not os.path.isfile(source):
        raise UsageError(
            f"{where}: audio file not found: {source!r} (relative paths start at {os.getcwd()})."
        )
    head = _head(value)
    kind = _file_kind(head)
    if kind is not None and kind[0] == "image":
        raise UsageError(
            f"{where}: {name} is an image ({kind[1]}), not audio: this model reads sound — give a sound file "
            "(.wav), or samples as an array with a `sampling_rate` column."
        )
    if kind == ("sound", "WAV"):
        # The standard library's wave module reads PCM WAV files with nothing to install; soundfile (libsndfile)
        # is used for other formats when it is installed.
        import wave

        try:
            with wave.open(source, "rb") as f:
                rate, frames, channels, width = (
                    f.getframerate(),
                    f.getnframes(),
                    f.getnchannels(),
                    f.getsampwidth(),
                )
        except (wave.Error, EOFError, OSError) as exc:
            raise UsageError(f"{where}: {name} cannot be read as a WAV file ({exc}).") from None
        if isinstance(source, io.BytesIO):
            source.seek(0)

        def read() -> np.ndarray:
            with wave.open(source, "rb") as f:
                raw = f.readframes(frames)
            if isinstance(source, io.BytesIO):
                source.seek(0)
            if width == 3:  # 24-bit PCM: widen each sample to 32 bits
                bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
                raw = np.pad(bytes3, ((0, 0), (1, 0))).tobytes()
                width_ = 4
            else:
                width_ = width
            dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width_]
            return _mono(np.frombuffer(raw, dtype=dtype).reshape(-1, channels).T, where)

        return _Sound(rate, frames, read)
    unknown = (
        f"{where}: {name} is not a sound file this can read (not WAV, FLAC, OGG, MP3 or AIFF): give a sound file, "
        "or samples as an array with a `sampling_rate` column."
    )
    try:
        import soundfile
    except ImportError:
        if kind is None:
            raise UsageError(unknown) from None
        raise UsageError(
            f"{where}: {name} is {kind[1]} sound; reading sound formats other than WAV needs the soundfile package "
            "(pip install soundfile), or give the samples as an array with a `sampling_rate` column."
        ) from None
    try:
        info = soundfile.info(source)
    except Exception as exc:
        if kind is None:
            raise UsageError(unknown) from None
        raise UsageError(f"{where}: {name} cannot be read as sound ({exc}).") from None
    if isinstance(source, io.BytesIO):
        source.seek(0)

    def read_sf() -> np.ndarray:
        samples, _ = soundfile.read(source, dtype="float32", always_2d=True)
        return _mono(samples.T, where)

    return _Sound(int(info.samplerate), int(info.frames), read_sf)


def load_audio(example: dict) -> np.ndarray:
    """The example's audio as a float32 mono array (read from its file when it is one)."""
    value = example["media"]
    if isinstance(value, np.ndarray):
        return value
    where = f"`{example['source']}[{example['record']}]`"
    try:
        return _open_sound(value, where).read()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{where}: the audio {_name(value)} cannot be decoded ({exc}).") from None


# ------------------------------------------------------------------------------------------------ batches


class MediaCollator:
    """Examples → one batch of the model's inputs, made by the processor: ``pixel_values`` for images; the
    feature extractor's ``input_features`` / ``input_values`` (with ``attention_mask`` when the extractor makes
    one, i.e. where the model takes it) for audio, padded to the longest clip of the batch where the extractor
    pads to a length of its own choosing; ``labels``: class ids, or transcript token ids padded with -100.
    ``units(batch)``: images, or seconds of audio, in the batch."""

    def __init__(self, task: str, processor: Any):
        self.task = task
        self.processor = processor
        self._last: tuple[Any, float] | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return self.inputs(examples, with_labels=True)

    def inputs(self, examples: list[dict], with_labels: bool = True) -> dict[str, torch.Tensor]:
        """The batch for ``examples`` (without ``labels`` when ``with_labels`` is False: for prediction)."""
        if self.task == "IMAGE_CLS":
            images = [load_image(ex) for ex in examples]
            batch = {
                "pixel_values": image_processor(self.processor)(images, return_tensors="pt")["pixel_values"]
            }
            seconds = float(len(examples))
        else:
            extractor = feature_extractor(self.processor)
            waves = [load_audio(ex) for ex in examples]
            kwargs: dict[str, Any] = {"sampling_rate": int(extractor.sampling_rate), "return_tensors": "pt"}
            if _pads_to_longest_only_if_asked(extractor):
                kwargs["padding"] = "longest"
            batch = dict(extractor(waves, **kwargs))
            seconds = sum(len(w) for w in waves) / int(extractor.sampling_rate)
        if with_labels and self.task == "ASR":
            width = max(len(ex["labels"]) for ex in examples)
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
            for row, ex in enumerate(examples):
                labels[row, : len(ex["labels"])] = torch.tensor(ex["labels"], dtype=torch.long)
            batch["labels"] = labels
        elif with_labels:
            batch["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        self._last = (batch, seconds)
        return batch

    def units(self, batch: dict[str, Any]) -> float:
        """Images, or seconds of audio, in ``batch`` (one this collator made)."""
        if self._last is not None and self._last[0] is batch:
            return self._last[1]
        first = next(iter(batch.values()))
        return float(first.shape[0]) if self.task == "IMAGE_CLS" else 0.0


def _pads_to_longest_only_if_asked(extractor: Any) -> bool:
    """Feature extractors that pad nothing unless asked (wav2vec2, HuBERT) need ``padding`` for a batch of clips
    of different lengths; those that pad to a fixed length themselves (Whisper, AST) keep their own."""
    try:
        default = inspect.signature(extractor.__call__).parameters["padding"].default
    except (KeyError, ValueError, TypeError):
        return False
    return default is False


# ------------------------------------------------------------------------------------------------ one input


def media_inputs(
    value: Any, processor: Any, task: str, what: str = "input", model: Any = None
) -> tuple[dict, str]:
    """One image or audio clip (the shapes a training record's column takes, or a whole record) as the model's
    inputs, and a short description of it ("image 32×32", "audio 1.50 s"), for ``compare`` and ``classify``.
    ``model``: the (base) model the inputs are for, to check the processor against (``check_processor_fits``)."""
    _check_processor(processor, "AUDIO_CLS" if task == "ASR" else task)
    if model is not None:
        check_processor_fits(model, processor, task)
    if isinstance(value, Mapping) and not _is_image_dict(value) and "array" not in value:
        columns = IMAGE_COLUMNS if task == "IMAGE_CLS" else AUDIO_COLUMNS
        key = next((c for c in columns if c in value), None)
        if key is None:
            raise UsageError(
                f"`{what}` is a record with keys {list(value)[:8]}; it needs one of {', '.join(columns)}."
            )
        rate = next((value[c] for c in _RATE_COLUMNS if c in value), None)
        value = (
            value[key]
            if rate is None or task == "IMAGE_CLS"
            else {"array": value[key], "sampling_rate": rate}
        )
    where = f"`{what}`"
    if task == "IMAGE_CLS":
        media = check_image(value, where)
        described = f"image {media.size[0]}×{media.size[1]}"
    else:
        media = check_audio(value, None, int(feature_extractor(processor).sampling_rate), where)
        described = f"audio {media.seconds:.2f} s"
    example = {"source": what, "record": 0, "media": media.value}
    collator = MediaCollator("AUDIO_CLS" if task == "ASR" else task, processor)
    return collator.inputs([example], with_labels=False), described


def describe_media(prepared: PreparedData) -> list[tuple[str, str]]:
    """Facts about prepared media data for the data preview: examples, classes, image sizes or audio lengths."""
    examples = list(prepared.train) + list(prepared.eval or [])
    facts = []
    if prepared.task == "IMAGE_CLS":
        sizes = sorted({ex["size"] for ex in examples})
        shown = ", ".join(f"{w}×{h}" for w, h in sizes[:4]) + (
            f", … ({len(sizes)} sizes)" if len(sizes) > 4 else ""
        )
        facts.append(("images", f"{len(examples):,}: {shown}"))
    else:
        seconds = [ex["seconds"] for ex in examples]
        facts.append(
            (
                "audio",
                f"{len(examples):,} clips, {sum(seconds):,.1f} s in all ({min(seconds):.2f} to {max(seconds):.2f} s "
                f"each)",
            )
        )
    if prepared.label_names:
        counts = [0] * len(prepared.label_names)
        for ex in examples:
            if 0 <= ex["label"] < len(counts):
                counts[ex["label"]] += 1
        facts.append(
            ("classes", " · ".join(f"{n} {c:,}" for n, c in zip(prepared.label_names, counts, strict=True)))
        )
    if prepared.task == "ASR":
        lengths = [len(ex["labels"]) for ex in examples]
        facts.append(("transcripts", f"{sum(lengths):,} tokens ({min(lengths)} to {max(lengths)} each)"))
    return facts
