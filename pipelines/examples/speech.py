"""Spoken digits and numbers synthesised with eSpeak NG, written as 16 kHz 16-bit WAV.

eSpeak NG is GPL-3.0; it reaches this project only as the optional ``examples`` extra
(the ``espeakng-loader`` wheel: ``libespeak-ng`` and its voice data). It is loaded here
alone, inside worker processes (``python -m pipelines.examples.speech``), never imported
by the rest of the package; its output, the clips, is data.

Determinism: eSpeak seeds the noise of breathy voices (``f2``, ``f5`` ...) from the clock,
so each clip sets ``espeak_ng_SetRandSeed`` from its plan index first. And libespeak-ng
keeps state across utterances that ``espeak_Terminate`` does not reset (a clip's length
moves by a few samples with what was said before it), so the clips are cut into
``WORKERS`` fixed chunks, each synthesised in order by a fresh process: the same plan gives
the same bytes whatever the machine's core count, and the chunks run in parallel.

A voice is an eSpeak *variant* (timbre: ``f3``, ``klatt4``, ``Annie`` ...) spoken with an
English accent (``en-us``, ``en-gb-scotland`` ...); the variants are split between train
and eval, so a model is evaluated on voices it never heard.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines.examples.words import number_words

EXTRA_HINT = (
    "the digits corpus synthesises speech with eSpeak NG (GPL-3.0), an optional extra: "
    "pip install 'omni-dfm[examples]' (or espeakng-loader==0.2.4), or build without "
    "speech with --no-speech"
)
SAMPLE_RATE = 16_000  # the audio tokenizer's rate
WORKERS = 2  # fixed, not the core count: the chunking decides the bytes (module docstring)
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
           "en-gb-x-gbclan", "en-gb-x-gbcwmd")  # fmt: skip
# Human-sounding variants; whisper, croak, robot and effect voices are left out.
TRAIN_VARIANTS = ("f1", "f2", "f4", "f5", "m1", "m2", "m3", "m5", "m6", "m8", "klatt",
                  "klatt2", "klatt3", "klatt5", "Alex", "Andy", "Gene", "Jacky", "Lee",
                  "Michael", "Mike", "Reed", "adam", "anika", "aunty", "belinda", "benjamin",
                  "caleb", "edward", "grandma", "john", "max")  # fmt: skip
EVAL_VARIANTS = ("f3", "m4", "m7", "klatt4", "Annie", "david", "linda", "norbert")
RATES = (130, 220)  # words per minute (eSpeak's default is 175)
PITCHES = (30, 70)  # 0..100 (default 50)
PEAK = 0.8  # every clip is scaled to this peak: variants differ ~8x in loudness


class SpeechUnavailable(RuntimeError):
    """The ``examples`` extra (eSpeak NG) is not installed."""


class SpeechFailed(RuntimeError):
    """A synthesis worker failed; the message ends with its stderr."""


@dataclass(frozen=True)
class SpeechClip:
    """One clip to synthesise: ``text`` spoken by ``accent+variant`` at ``rate`` words per
    minute and ``pitch``, with noise seeded by ``seed``, written to ``path`` (relative to
    the corpus root)."""

    path: str
    text: str
    accent: str
    variant: str
    rate: int
    pitch: int
    seed: int

    @property
    def voice(self) -> str:
        """eSpeak's voice name, e.g. ``en-us+f3``."""
        return f"{self.accent}+{self.variant}"

    @property
    def split(self) -> str:
        return "eval" if self.variant in EVAL_VARIANTS else "train"


def require_espeak() -> None:
    """Raise :class:`SpeechUnavailable` with the install hint unless the extra is there."""
    if importlib.util.find_spec("espeakng_loader") is None:
        raise SpeechUnavailable(EXTRA_HINT)


def plan_clips(
    rng: np.random.Generator, clips_per_digit: int, numbers_per_voice: int
) -> list[tuple[SpeechClip, str]]:
    """Every clip with its label: per variant, each digit ``clips_per_digit`` times and
    ``numbers_per_voice`` numbers from 10 to 99, each with a random accent, rate and pitch.

    Labels are the number as digits ("7", "42"). Paths are ``media/audio/NNNNN.wav`` in
    plan order.
    """
    spoken: list[tuple[str, str, str]] = []
    for variant in TRAIN_VARIANTS + EVAL_VARIANTS:
        numbers = [d for d in range(10) for _ in range(clips_per_digit)]
        numbers += [int(n) for n in rng.integers(10, 100, size=numbers_per_voice)]
        spoken += [(variant, number_words(n), str(n)) for n in numbers]
    clips = []
    for index, (variant, text, label) in enumerate(spoken):
        clip = SpeechClip(
            path=f"media/audio/{index:05d}.wav",
            text=text,
            accent=str(rng.choice(ACCENTS)),
            variant=variant,
            rate=int(rng.integers(RATES[0], RATES[1] + 1)),
            pitch=int(rng.integers(PITCHES[0], PITCHES[1] + 1)),
            seed=index,
        )
        clips.append((clip, label))
    return clips


class SynthesisJob:
    """The worker processes synthesising ``clips`` under ``root``; started at once so the
    caller can build other media meanwhile, joined with :meth:`wait`."""

    def __init__(self, clips: list[SpeechClip], root: Path) -> None:
        require_espeak()
        (root / "media" / "audio").mkdir(parents=True, exist_ok=True)
        size = math.ceil(len(clips) / WORKERS) if clips else 0
        chunks = [clips[start : start + size] for start in range(0, len(clips), size or 1)]
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
        self._workers = []
        for chunk in chunks:
            worker = subprocess.Popen(
                [sys.executable, "-m", "pipelines.examples.speech"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
            )
            request = {"root": str(root), "clips": [asdict(clip) for clip in chunk]}
            self._workers.append((worker, json.dumps(request).encode()))

    def wait(self) -> None:
        """Block until every clip is written; raise :class:`SpeechFailed` if a worker failed."""
        failures = []
        for worker, request in self._workers:
            _, stderr = worker.communicate(request)
            if worker.returncode != 0:
                tail = stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
                failures.append(f"exit {worker.returncode}: " + " | ".join(tail))
        if failures:
            raise SpeechFailed("speech synthesis failed: " + "; ".join(failures))

    def cancel(self) -> None:
        """Kill the workers that are still running (the build failed elsewhere)."""
        for worker, _ in self._workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


class _Espeak:
    """libespeak-ng through ctypes, in synchronous mode: ``espeak_Synth`` returns once the
    callback has seen every sample (7x faster here than retrieval mode, whose
    ``espeak_Synchronize`` polls a synthesis thread)."""

    _OUTPUT_SYNCHRONOUS = 2
    _RATE, _PITCH = 1, 3  # espeak_PARAMETER
    _END_PAUSE = 0x1000  # espeakENDPAUSE: the clip ends with a short silence

    def __init__(self) -> None:
        import ctypes

        import espeakng_loader  # GPL-3.0: loaded only in this worker process

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        data = espeakng_loader.get_data_path().encode()
        self.rate = lib.espeak_Initialize(self._OUTPUT_SYNCHRONOUS, 0, data, 0)
        if self.rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.rate}) with data at {data!r}")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
        )

        def collect(samples, count, _events):  # noqa: ANN001 - a C callback
            if count > 0:
                self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
            return 0

        self._callback = callback_type(collect)  # kept referenced while the library holds it
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib

    def synth(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
        """``text`` spoken by ``voice``: (n,) int16 at ``self.rate`` Hz."""
        lib = self._lib
        lib.espeak_ng_SetRandSeed(seed)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(self._RATE, rate, 0)
        lib.espeak_SetParameter(self._PITCH, pitch, 0)
        self._chunks.clear()
        encoded = text.encode("utf-8")
        error = lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, self._END_PAUSE, None, None)
        lib.espeak_Synchronize()
        if error != 0 or not self._chunks:
            raise RuntimeError(f"espeak_Synth failed ({error}) on {text!r} with {voice}")
        return np.concatenate(self._chunks)


@functools.cache
def _antialias_filter(up: int, down: int) -> np.ndarray:
    """The low-pass FIR ``resample_poly`` designs by default (Kaiser, beta 5): 8,821 taps
    for 22,050 -> 16,000 Hz. Designed once here; resample_poly would redo it every clip,
    which took 80% of the synthesis time."""
    from scipy.signal import firwin

    rate = max(up, down)
    return firwin(2 * 10 * rate + 1, 1.0 / rate, window=("kaiser", 5.0))


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """int16 samples at ``rate`` Hz -> int16 at 16 kHz (polyphase), peak scaled to PEAK."""
    from scipy.signal import resample_poly

    divisor = math.gcd(SAMPLE_RATE, rate)
    up, down = SAMPLE_RATE // divisor, rate // divisor
    audio = resample_poly(samples.astype(np.float64), up, down, window=_antialias_filter(up, down))
    peak = float(np.max(np.abs(audio)))
    if peak == 0.0:
        raise ValueError("silent clip")
    return np.rint(audio * (PEAK * 32767 / peak)).astype(np.int16)


def wav_bytes(samples: np.ndarray) -> bytes:
    """Mono 16-bit PCM WAV at 16 kHz (the stdlib writer: a fixed 44-byte header)."""
    import io

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def _worker_main() -> None:
    """Synthesise the clips of the JSON request on stdin, in order, into their files."""
    request = json.loads(sys.stdin.buffer.read())
    root = Path(request["root"])
    engine = _Espeak()
    for fields in request["clips"]:
        clip = SpeechClip(**fields)
        samples = engine.synth(clip.text, clip.voice, clip.rate, clip.pitch, clip.seed)
        (root / clip.path).write_bytes(wav_bytes(to_16k(samples, engine.rate)))


if __name__ == "__main__":
    _worker_main()
