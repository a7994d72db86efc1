"""Datasets, chat templates and the stateful prompt sampler.

    rows = load_rows(recipe.data.train, recipe.source, "train", recipe.data)   # list of dicts
    text, ids = render_prompt(rows[0], tokenizer, recipe.data)
    sampler = PromptSampler(len(rows), seed=recipe.data.seed)
    batch = [rows[i] for i in sampler.next_batch(32)]                          # checkpoint: state_dict()

Every row has ``prompt``: a string, or a chat message list ``[{"role", "content"}, ...]``; its
other fields (``answer``, ...) go to the reward plugins. Bad data is reported before training
starts by a :class:`DataError` naming the file, the line (or row), the field and the fix.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from mispo.config import DataConfig

DEFAULT_TRAIN_SIZE = 10_000  # rows of a builtin task's train split (data.builtin.train_size)


class DataError(ValueError):
    """A dataset is unusable; the message names the file, the line or row, the field and the fix."""


# --------------------------------------------------------------------------- rows
def load_rows(spec: str | None, recipe_source: str | None, split: Literal["train", "eval", "sft"],
              config: DataConfig, n: int | None = None, on_invalid: Literal["raise", "skip"] = "raise",
              ) -> list[dict]:
    """Rows of ``spec``: ``builtin:<task>`` (mispo.tasks), a .jsonl / .json / .parquet file, a folder
    written by ``datasets``' ``save_to_disk``, or a hub dataset ``hf:NAME[:CONFIG][@SPLIT]`` (see
    ``parse_hf_spec``; needs the hub, or ``HF_HUB_OFFLINE=1`` and a cached copy).

    Files are read with ``datasets``, found relative to the cwd or else to the recipe's folder;
    columns are renamed by ``config.fields`` ({ours: theirs}) and ``config.prompt_field`` (that
    column becomes ``prompt``); the first ``n`` rows are kept (when None: all, or
    ``config.eval_size`` for eval). Builtin tasks get ``config.builtin`` as options (``seed``
    defaults to ``config.seed``; ``train_size``, default 10000, is the train / sft size when
    ``n`` is None; eval defaults to ``config.eval_size`` rows).
    ``split="sft"`` gives warm-up rows, which also need a string ``completion``.
    A row whose prompt is missing or not a string / message list raises DataError, or with
    ``on_invalid="skip"`` is dropped with one warning giving the count. ``spec`` None: [].
    """
    if spec is None:
        return []
    if spec.startswith("builtin:"):
        return _builtin_rows(spec.removeprefix("builtin:"), split, config, n)
    if spec.startswith("hf:"):
        path = Path(spec)  # names the source in messages
        rows = _read_hub(spec, split)
    else:
        path = _resolve(spec, recipe_source, split)
        rows = _read_saved(path, split) if path.is_dir() else _read_file(path, config.prompt_field)
    mapping = _mapping(config)
    rows = _rename(rows, mapping, path)
    if n is None and split == "eval":
        n = config.eval_size
    if n is not None:
        rows = rows[:n]
    bad = [(i, msg) for i, row in enumerate(rows) if (msg := check_row(row, split, mapping)) is not None]
    if bad and on_invalid == "raise":
        i, msg = bad[0]
        more = f" ({len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise DataError(f"{path}, {_where(path, i)}: {msg}{more}")
    if bad:
        import warnings

        warnings.warn(f"{path}: skipped {len(bad)} of {len(rows)} rows without a valid prompt "
                      f"(first: {_where(path, bad[0][0])}: {bad[0][1]})", stacklevel=2)
        dropped = {i for i, _ in bad}
        rows = [r for i, r in enumerate(rows) if i not in dropped]
    if not rows:
        raise DataError(f"{path}: no rows; fix: give a file with at least one row")
    return rows


def _builtin_rows(name: str, split: str, config: DataConfig, n: int | None) -> list[dict]:
    from mispo.tasks import get_task

    opts = dict(config.builtin)
    seed = int(opts.pop("seed", config.seed))
    train_size = int(opts.pop("train_size", DEFAULT_TRAIN_SIZE))
    try:
        task = get_task(name)
        if split == "train":
            return task.train_rows(train_size if n is None else n, seed, **opts)
        if split == "eval":
            return task.eval_rows(config.eval_size if n is None else n, seed, **opts)
        if split == "sft":
            return task.sft_rows(train_size if n is None else n, seed, **opts)
    except ValueError as exc:
        raise DataError(f"builtin:{name} ({split}): {exc}") from None
    raise ValueError(f"split must be 'train', 'eval' or 'sft', not {split!r}")


def _key(split: str) -> str:
    """The recipe field that names a split's data."""
    return {"train": "data.train", "eval": "data.eval"}.get(split, "warmup.data")


LOCAL_FIX = ("point it at a local .jsonl / .json / .parquet file or a datasets.save_to_disk folder "
             "(relative to the cwd or the recipe)")


def _resolve(spec: str, recipe_source: str | None, split: str) -> Path:
    key = _key(split)
    path = Path(spec)
    if not path.exists() and recipe_source is not None and (Path(recipe_source).parent / spec).exists():
        path = Path(recipe_source).parent / spec
    if not path.exists():
        raise DataError(f"{key} = {spec!r}: no such file; fix: give a .jsonl / .json / .parquet path "
                        "or a datasets.save_to_disk folder (relative to the cwd or the recipe), "
                        "hf:NAME[:CONFIG][@SPLIT] or builtin:<task>")
    if path.is_dir():
        if not any((path / f).exists() for f in SAVED_MARKERS):
            raise DataError(f"{key} = {spec!r} is a folder but not one written by datasets' save_to_disk (no "
                            f"{' / '.join(SAVED_MARKERS)}); fix: give a data file, or hf:{spec} to read the folder's "
                            "data files with datasets.load_dataset")
        return path
    if _format(path) is None:
        raise DataError(f"{key} = {spec!r}: unknown format {path.suffix!r}; "
                        "fix: use .jsonl, .json or .parquet")
    return path


def _format(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "parquet" if suffix == ".parquet" else "json" if suffix in (".jsonl", ".json", ".ndjson") else None


def _read_file(path: Path, prompt_field: str) -> list[dict]:
    import datasets

    if _format(path) == "json" and _blank(path):
        raise DataError(f"{path}: no rows (the file is empty); fix: give a file with at least one row")

    try:
        ds = datasets.load_dataset(_format(path), data_files=str(path), split="train")
    except Exception as exc:  # find the bad line ourselves: pyarrow's messages rarely name it
        if _format(path) == "json":
            _diagnose_json(path, prompt_field)
        raise DataError(f"{path}: cannot be read as {_format(path)} ({type(exc).__name__}: {exc}); fix: "
                        "check that the file is valid and each column has one type in every row") from None
    return ds.to_list()


# --------------------------------------------------------------------------- hub and saved datasets
DEFAULT_SPLITS = {"train": "train", "eval": "test", "sft": "train"}  # when the spec names none
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # a DatasetDict / a Dataset written by save_to_disk
HUB_PROBE_TIMEOUT_S = 3.0


def parse_hf_spec(spec: str, split: str = "train") -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> ``(NAME, CONFIG or None, SPLIT)``, as ``datasets.load_dataset(NAME,
    CONFIG, split=SPLIT)`` takes them; SPLIT defaults to ``DEFAULT_SPLITS[split]`` (train, or test for eval)
    and may slice (``train[:1000]``). ``hf:openai/gsm8k:main@train`` -> ``("openai/gsm8k", "main", "train")``."""
    body = spec.removeprefix("hf:")
    body, at, ds_split = body.rpartition("@") if "@" in body else (body, "", DEFAULT_SPLITS[split])
    name, _, config = body.partition(":")
    if not name or (at and not ds_split) or (":" in body and not config):
        raise DataError(f"{_key(split)} = {spec!r}: expected hf:NAME[:CONFIG][@SPLIT], e.g. "
                        "hf:openai/gsm8k:main@train")
    return name, config or None, ds_split


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (a HEAD request to it, HUB_PROBE_TIMEOUT_S at most), or None."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # DNS, refused, timeout, proxy: all mean "not reachable from here"
        return f"{constants.ENDPOINT} is unreachable ({type(exc).__name__}: {exc})"
    return None


def _read_hub(spec: str, split: str) -> list[dict]:
    """Rows of a hub dataset (or of a local folder of data files named as NAME) through datasets.load_dataset.
    Without the hub this fails within seconds, not after datasets' retries: the hub is probed first unless
    HF_HUB_OFFLINE is set (then datasets reads only its cache)."""
    import datasets

    name, config, ds_split = parse_hf_spec(spec, split)
    key = _key(split)
    local = Path(name).exists()
    if not local and not _hub_offline() and (why := _hub_unreachable()):
        raise DataError(f"{key} = {spec!r}: cannot load the hub dataset: {why}; fix: {LOCAL_FIX}, or set "
                        "HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache")
    try:
        ds = datasets.load_dataset(name, config, split=ds_split)
    except Exception as exc:
        offline = " (HF_HUB_OFFLINE is set: only cached datasets load)" if _hub_offline() and not local else ""
        raise DataError(f"{key} = {spec!r}: datasets.load_dataset({name!r}, {config!r}, split={ds_split!r}) "
                        f"failed{offline}: {type(exc).__name__}: {exc}; fix: check the name, config and split, "
                        f"or {LOCAL_FIX}") from None
    return ds.to_list()


def _read_saved(path: Path, split: str) -> list[dict]:
    """Rows of a save_to_disk folder: a Dataset, or a DatasetDict's ``DEFAULT_SPLITS[split]`` split."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: datasets.load_from_disk failed ({type(exc).__name__}: {exc}); fix: give a "
                        "folder written by save_to_disk, or a data file") from None
    if isinstance(ds, datasets.DatasetDict):
        want = DEFAULT_SPLITS[split]
        if want not in ds:
            raise DataError(f"{_key(split)} = {str(path)!r}: the saved DatasetDict has splits {sorted(ds)}, not "
                            f"{want!r}; fix: point at the split's own folder ({path}/<split>)")
        ds = ds[want]
    return ds.to_list()


def _blank(path: Path) -> bool:
    """True when the file holds only whitespace (read until the first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _diagnose_json(path: Path, prompt_field: str) -> None:
    """Raise a DataError at the first line of a JSON / JSON-lines file that explains a load failure."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON array
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}); fix: correct the JSON "
                            "syntax there") from None
        lines = [(f"row {i + 1}", item) for i, item in enumerate(items)]
    else:
        lines = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg} at column "
                                f"{exc.colno}); fix: each line must be one complete JSON object") from None
    types: dict[str, tuple[str, str]] = {}
    for where, item in lines:
        if not isinstance(item, dict):
            raise DataError(f"{path}, {where}: a row must be a JSON object, not {type(item).__name__}; "
                            f"fix: write {{\"{prompt_field}\": ...}}")
        for key, value in item.items():
            kind = _kind(value)
            if value is not None and types.setdefault(key, (kind, where))[0] != kind:
                first_kind, first_where = types[key]
                raise DataError(f"{path}, {where}: field {key!r} is a {kind} here but a {first_kind} at "
                                f"{first_where}; fix: give the field one type in every row")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _mapping(config: DataConfig) -> dict[str, str]:
    mapping = dict(config.fields)
    if config.prompt_field != "prompt":
        if mapping.get("prompt", config.prompt_field) != config.prompt_field:
            raise DataError(f"data.prompt_field = {config.prompt_field!r} and data.fields.prompt = "
                            f"{mapping['prompt']!r} disagree; fix: set only one of them")
        mapping["prompt"] = config.prompt_field
    return mapping


def _rename(rows: list[dict], mapping: dict[str, str], path: Path) -> list[dict]:
    """Rename columns {ours: theirs}; every 'theirs' must be a column of the file."""
    if not mapping or not rows:
        return rows
    columns = set(rows[0])
    for ours, theirs in mapping.items():
        if theirs not in columns:
            raise DataError(f"{path}: data.fields maps {ours!r} to the column {theirs!r}, which the file "
                            f"lacks (columns: {', '.join(sorted(columns))}); fix: correct data.fields")
    sources = set(mapping.values())
    return [{**{k: v for k, v in row.items() if k not in sources},
             **{ours: row[theirs] for ours, theirs in mapping.items()}} for row in rows]


def _where(path: Path, index: int) -> str:
    """'line N' of row ``index`` in a JSON-lines file (blank lines skipped), else 'row N' (1-based)."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        seen = -1
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                seen += bool(line.strip())
                if seen == index:
                    return f"line {lineno}"
    return f"row {index + 1}"


def check_row(row: dict, split: str = "train", mapping: dict[str, str] | None = None) -> str | None:
    """None if ``row`` is usable, else what is wrong with which field and the fix.

    ``mapping`` ({ours: theirs}, as data.fields) only makes the messages name the file's columns.
    """
    msg = _check_row(row, split)
    if msg and mapping:
        for ours, theirs in mapping.items():
            msg = msg.replace(f"field '{ours}'", f"field '{ours}' (the file's column '{theirs}')", 1)
    return msg


def _check_row(row: dict, split: str) -> str | None:
    prompt = row.get("prompt")
    if prompt is None:
        return ("field 'prompt' is missing or null; fix: add it, or map your column with "
                "data.fields: {prompt: <column>} (or data.prompt_field)")
    if isinstance(prompt, str):
        if not prompt:
            return "field 'prompt' is an empty string; fix: give a non-empty prompt"
    elif isinstance(prompt, list):
        for j, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                return (f"field 'prompt' message {j} is not {{'role': str, 'content': str}}; fix: give a "
                        "string or a list of chat messages")
        if not prompt:
            return "field 'prompt' is an empty message list; fix: give at least one message"
    else:
        return (f"field 'prompt' has type {type(prompt).__name__}; fix: give a string or a list of chat "
                "messages [{'role': 'user', 'content': ...}]")
    if split == "sft" and not isinstance(row.get("completion"), str):
        return ("field 'completion' (the warm-up target) is missing or not a string; fix: add it or map "
                "a column with data.fields: {completion: <column>}")
    return None


# --------------------------------------------------------------------------- chat templates
def render_prompt(row: dict, tokenizer, config: DataConfig) -> tuple[str, list[int]]:
    """``(prompt_text, prompt_ids)`` for one row.

    With ``config.chat_template`` and a tokenizer that has one: a string prompt becomes one user
    message (a message list is used as given), ``config.system_prompt`` is prepended unless the
    messages start with a system message, and the template is applied with the generation
    prompt; the text is tokenized without adding special tokens (the template has them).
    Otherwise the plain prompt (after the system prompt and a blank line, if any), tokenized
    with the tokenizer's usual special tokens (e.g. BOS).
    """
    prompt = row["prompt"]
    if config.chat_template and getattr(tokenizer, "chat_template", None):
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:  # datasets gives every message every key seen in the file, None where absent
            messages = [{k: v for k, v in m.items() if v is not None} for m in prompt]
        if config.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": config.system_prompt}] + messages
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        why = "the tokenizer has no chat template" if config.chat_template else "data.chat_template is false"
        raise DataError(f"a prompt is a chat message list but {why}; fix: set data.chat_template: true with "
                        "a tokenizer that has a chat template, or give string prompts")
    text = f"{config.system_prompt}\n\n{prompt}" if config.system_prompt else prompt
    return text, list(tokenizer(text)["input_ids"])


# --------------------------------------------------------------------------- sampler
class PromptSampler:
    """Endless shuffled passes over ``num_rows`` row indices, checkpointable.

    Epoch ``e`` visits every index once, in the order of ``random.Random(f"...:{seed}:{e}")``
    (identity order when ``shuffle`` is False). ``next_batch(k)`` continues where the last call
    stopped, crossing epoch boundaries; ``load_state_dict(state_dict())`` on a fresh sampler
    continues exactly, with no index repeated or skipped.
    """

    def __init__(self, num_rows: int, seed: int = 0, shuffle: bool = True):
        if num_rows < 1:
            raise DataError("the dataset has no rows; fix: give a dataset with at least one prompt")
        self.num_rows, self.seed, self.shuffle = int(num_rows), int(seed), bool(shuffle)
        self.epoch, self.position = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            self._order = list(range(self.num_rows))
            if self.shuffle:
                random.Random(f"mispo.PromptSampler:{self.seed}:{self.epoch}").shuffle(self._order)
        return self._order

    def next_batch(self, k: int) -> list[int]:
        """The next ``k`` row indices."""
        out: list[int] = []
        while len(out) < k:
            take = min(k - len(out), self.num_rows - self.position)
            out += self._epoch_order()[self.position:self.position + take]
            self.position += take
            if self.position == self.num_rows:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"num_rows": self.num_rows, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_rows"]) != self.num_rows:
            raise DataError(f"the checkpoint's sampler covered {state['num_rows']} rows but the dataset now "
                            f"has {self.num_rows}; fix: resume with the same data (and data.builtin options)")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None

    def metrics(self) -> dict[str, float]:
        """``data/epoch`` (1.5: half-way through the 2nd pass), ``data/position``, ``data/samples_seen``."""
        return {"data/epoch": self.epoch + self.position / self.num_rows, "data/position": self.position,
                "data/samples_seen": self.epoch * self.num_rows + self.position}
