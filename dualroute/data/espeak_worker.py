"""Speak a list of words with eSpeak NG in this process, writing 16-bit PCM to stdout (standard library only).

Run by ``speech_synth`` as ``python -I espeak_worker.py`` with a JSON job on stdin::

    {"library": ".../libespeak-ng.so", "data_parent": "<folder holding espeak-ng-data>",
     "items": [[text, voice, rate, pitch], ...]}

and for each item writes a 4-byte little-endian sample count and that many int16 samples (22,050 Hz).

Why a process per job: libespeak-ng keeps state from one utterance to the next (a repeated word comes out
different even after ``espeak_Terminate``/``espeak_Initialize``), while a fresh process speaking the same
list in the same order is bit-identical; so each job runs in a new process and the output is deterministic.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys

AUDIO_OUTPUT_SYNCHRONOUS = 2  # speak_lib.h: espeak_AUDIO_OUTPUT
INITIALIZE_DONT_EXIT = 0x8000
ESPEAK_RATE, ESPEAK_PITCH = 1, 3  # espeak_PARAMETER
POS_CHARACTER, CHARS_UTF8 = 1, 1
SAMPLE_RATE = 22050
RAND_SEED = 1

# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); return 0 to continue
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def speak_all(library: str, data_parent: str, items: list[list]) -> list[bytes]:
    lib = ctypes.CDLL(library)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent.encode(), INITIALIZE_DONT_EXIT)
    if rate != SAMPLE_RATE:
        raise RuntimeError(f"espeak_Initialize returned {rate} (expected the sample rate {SAMPLE_RATE}); "
                           f"is {data_parent}/espeak-ng-data complete?")
    chunks: list[bytes] = []

    def on_audio(wav, n, events) -> int:
        if wav and n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    callback = _CALLBACK(on_audio)  # kept referenced while the library may call it
    lib.espeak_SetSynthCallback(callback)
    out = []
    variants = os.path.join(data_parent, "espeak-ng-data", "voices", "!v")
    for text, voice, speed, pitch in items:
        variant = voice.partition("+")[2]  # an unknown variant would be ignored without a word
        if lib.espeak_SetVoiceByName(voice.encode()) != 0 or (variant and not os.path.isfile(
                os.path.join(variants, variant))):
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(ESPEAK_RATE, int(speed), 0)
        lib.espeak_SetParameter(ESPEAK_PITCH, int(pitch), 0)
        lib.espeak_ng_SetRandSeed(ctypes.c_long(RAND_SEED))  # roughness and other variants draw random numbers
        chunks.clear()
        text_b = text.encode() + b"\0"
        if lib.espeak_Synth(text_b, len(text_b), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak_Synth failed on {text!r} with voice {voice!r}")
        out.append(b"".join(chunks))
    return out


def main() -> int:
    job = json.load(sys.stdin)
    try:
        pcm = speak_all(job["library"], job["data_parent"], job["items"])
    except (ValueError, RuntimeError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    for samples in pcm:
        sys.stdout.buffer.write(struct.pack("<I", len(samples) // 2) + samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
