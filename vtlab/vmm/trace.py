"""The record of every VM entry and VM exit, ready for pandas.

A :class:`Trace` collects one :class:`TraceEvent` per VM entry and per VM exit.  Its
:meth:`Trace.to_dataframe` gives one row per exit (the shape the cost model and the
plots use); ``include_entries=True`` interleaves the entries too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from ..arch.exit_reasons import EXIT_REASON_INFO


@dataclass
class TraceEvent:
    """One VM entry or VM exit."""

    seq: int
    event: str                      #: "entry" or "exit"
    reason: str = ""                #: ExitReason member name (exits)
    reason_number: int = -1
    category: str = ""
    qualification: int = 0
    decoded: dict = field(default_factory=dict)
    instruction_length: int = 0
    guest_rip: int = 0
    instruction: str = ""
    handler: str = ""
    guest_instructions: int = 0     #: cumulative guest instructions retired at this point
    cpl: int = 0
    entry_failure: bool = False
    device: str | None = None
    state: str | tuple = ""         #: guest register summary (formatted on first use)
    note: str = ""


_STATE_NAMES = ("rax", "rbx", "rcx", "rdx", "rsp", "rflags", "cpl")


def format_state(state: str | tuple) -> str:
    """``(rax, rbx, rcx, rdx, rsp, rflags, cpl)`` -> ``"rax=0x1 ... cpl=0"``."""
    if isinstance(state, str):
        return state
    return " ".join(f"{n}={v:#x}" if n != "cpl" else f"cpl={v}" for n, v in zip(_STATE_NAMES, state))


def _entry_event(item: tuple) -> TraceEvent:
    """The TraceEvent of an entry kept as (seq, instruction, guest_rip, guest_instructions)."""
    seq, instruction, guest_rip, guest_instructions = item
    return TraceEvent(seq, "entry", instruction=instruction, guest_rip=guest_rip,
                      guest_instructions=guest_instructions)


class _ExitRecord:
    """An exit as recorded on the hot path: the VmExit and what the VMM adds, turned into
    a :class:`TraceEvent` the first time someone looks (most exits are only counted).

    ``device`` and ``note`` may still be set by the VMM after its handler ran; once the
    TraceEvent exists they are passed on to it.
    """

    __slots__ = ("seq", "exit", "handler", "state", "_device", "_note", "made")

    def __init__(self, seq: int, exit_, handler: str, state) -> None:
        self.seq, self.exit, self.handler, self.state = seq, exit_, handler, state
        self._device, self._note, self.made = exit_.device, exit_.note, None

    @property
    def device(self):
        return self._device

    @device.setter
    def device(self, value) -> None:
        self._device = value
        if self.made is not None:
            self.made.device = value

    @property
    def note(self) -> str:
        return self._note

    @note.setter
    def note(self, value: str) -> None:
        self._note = value
        if self.made is not None:
            self.made.note = value

    def event(self) -> TraceEvent:
        if self.made is None:
            e = self.exit
            self.made = TraceEvent(
                self.seq, "exit", e.reason.name, int(e.reason), EXIT_REASON_INFO[e.reason].category,
                e.qualification, e.decoded(), e.instruction_length, e.guest_rip, e.instruction,
                self.handler, e.guest_instructions, e.cpl, e.entry_failure, self._device, self.state,
                self._note)
        return self.made


def _made(item) -> TraceEvent:
    """The TraceEvent of one log item (an entry tuple, an exit record or a TraceEvent)."""
    kind = type(item)
    if kind is tuple:
        return _entry_event(item)
    if kind is _ExitRecord:
        return item.event()
    return item


_NEVER = 1 << 62   # (a log length never reached: an uncapped trace never trims)

#: How many events (entries and exits) a :class:`Trace` keeps unless told otherwise: the
#: last 100,000, i.e. 50,000 VM exits (some 35-45 MB; the course's biggest runs have 20,000).
#: A run of millions of exits would otherwise keep every one of them in memory (about
#: 350 bytes an event); older events are dropped, but every count stays exact (see
#: :meth:`Trace.counts`).  ``Trace(max_events=None)`` keeps everything.
DEFAULT_MAX_EVENTS = 100_000


class Trace:
    """Every VM entry and exit of one virtual machine, in order - or the last
    ``max_events`` of them (None: keep everything).

    A capped trace drops its oldest events as new ones arrive (in batches, so recording
    stays cheap); :meth:`counts` and :attr:`exits_total` still cover every exit ever
    recorded, and :attr:`dropped` says how many events are gone.  ``seq`` numbers keep
    counting across the drops, so the first event kept may have any ``seq``.
    """

    def __init__(self, max_events: int | None = DEFAULT_MAX_EVENTS) -> None:
        # One item per event, in order: a TraceEvent for each exit, and for each entry the
        # tuple (seq, instruction, guest_rip, guest_instructions) - an entry happens once
        # per exit and says little, so it becomes a TraceEvent only when someone looks
        # at :attr:`events` (which then keeps the objects it made).
        self._log: list = []
        self.instructions_total = 0
        self.enabled = True
        self._frame = None
        self._frame_key = None
        #: Events dropped to respect max_events (the next event's seq is len(log) + dropped).
        self.dropped = 0
        self._dropped_exits: dict[str, int] = {}  # reason name -> exits dropped
        self.max_events = max_events

    @property
    def max_events(self) -> int | None:
        """How many events the trace keeps (None: all); settable."""
        return self._max_events

    @max_events.setter
    def max_events(self, value: int | None) -> None:
        if value is not None and value < 1:
            raise ValueError("max_events must be at least 1 (or None: keep every event)")
        self._max_events = value
        # The log length at which _trim runs: a quarter more than the cap (at least 1,024).
        self._trim_at = _NEVER if value is None else value + max(value // 4, 1024)
        if len(self._log) >= self._trim_at:
            self._trim()

    @property
    def _seq(self) -> int:
        return len(self._log) + self.dropped

    @property
    def events(self) -> list[TraceEvent]:
        """Every entry and exit (kept) as a :class:`TraceEvent`, in order."""
        log = self._log
        for i, item in enumerate(log):
            if type(item) is not TraceEvent:
                log[i] = _made(item)
        return log

    @events.setter
    def events(self, events: list[TraceEvent]) -> None:
        self._log = events

    def _next(self) -> int:
        return self._seq

    def _trim(self) -> None:
        """Drop the oldest events beyond max_events, tallying the exits among them.

        Called once the log holds a quarter more than the cap (at least 1,024 more), so
        a trim moves the kept events' pointers once per max_events/4 recordings: recording
        stays O(1) on average and the log never holds more than 1.25 x max_events."""
        log, keep = self._log, self._max_events
        drop = len(log) - keep
        tally = self._dropped_exits
        for item in log[:drop]:
            kind = type(item)
            if kind is _ExitRecord:
                name = item.exit.reason.name
            elif kind is TraceEvent and item.event == "exit":
                name = item.reason
            else:
                continue
            tally[name] = tally.get(name, 0) + 1
        del log[:drop]
        self.dropped += drop

    def record_entry(self, instruction: str, guest_rip: int, guest_instructions: int) -> None:
        if self.enabled:
            log = self._log
            n = len(log)
            log.append((n + self.dropped, instruction, guest_rip, guest_instructions))
            if n >= self._trim_at:
                self._trim()

    def record_exit(self, exit_, handler: str = "", state: str = ""):
        """Record an exit; returns its record (``seq``, settable ``device`` and ``note``)."""
        log = self._log
        n = len(log)
        record = _ExitRecord(n + self.dropped, exit_, handler, state)
        if self.enabled:
            log.append(record)
            if n >= self._trim_at:
                self._trim()
        return record

    @property
    def exits(self) -> list[TraceEvent]:
        out = []
        log = self._log
        for i, item in enumerate(log):
            kind = type(item)
            if kind is _ExitRecord:
                item = log[i] = item.event()
                out.append(item)
            elif kind is TraceEvent and item.event == "exit":
                out.append(item)
        return out

    def __len__(self) -> int:
        """The number of exits kept (entries are not counted; see :attr:`exits_total`)."""
        return sum(1 for item in self._log if type(item) is _ExitRecord
                   or (type(item) is TraceEvent and item.event == "exit"))

    @property
    def exits_total(self) -> int:
        """Every exit recorded, including those a capped trace dropped."""
        return len(self) + sum(self._dropped_exits.values())

    def __iter__(self) -> Iterator[TraceEvent]:
        return iter(self.exits)

    def clear(self) -> None:
        self._log.clear()
        self._frame_key = None
        self._frame = None
        self.dropped = 0
        self._dropped_exits = {}

    def _kept_counts(self) -> dict[str, int]:
        """Exits per reason among the events kept, without making TraceEvents."""
        counts: dict[str, int] = {}
        for item in self._log:
            kind = type(item)
            if kind is _ExitRecord:
                name = item.exit.reason.name
            elif kind is TraceEvent and item.event == "exit":
                name = item.reason
            else:
                continue
            counts[name] = counts.get(name, 0) + 1
        return counts

    def counts(self):
        """Exits per reason, most frequent first (a pandas Series) - exact, including the
        exits a capped trace has dropped."""
        import pandas as pd

        counts = self._kept_counts()
        for name, n in self._dropped_exits.items():
            counts[name] = counts.get(name, 0) + n
        if not counts:
            return pd.Series(dtype=int, name="exits")
        series = pd.Series(counts, name="exits", dtype=int)
        # (value_counts order: most frequent first; ties in order of first appearance)
        return series.sort_values(ascending=False, kind="stable").rename_axis("reason")

    def to_dataframe(self, include_entries: bool = False):
        """One row per exit (and entry, if asked), columns as in :class:`TraceEvent`.

        The frame is cached until the trace grows; callers get a copy they may change.
        A capped trace shows the events it kept (``attrs["dropped"]`` says how many
        events are not shown).
        """
        import pandas as pd

        key = (self._seq, len(self._log), include_entries, self.instructions_total)
        if self._frame_key != key:
            columns = list(TraceEvent.__dataclass_fields__)
            rows = [tuple(getattr(e, c) for c in columns) for e in self._rows(include_entries)]
            at = columns.index("state")
            rows = [r[:at] + (format_state(r[at]),) + r[at + 1:] for r in rows]
            df = pd.DataFrame.from_records(rows, columns=columns)
            df.attrs["instructions_total"] = self.instructions_total
            self._frame, self._frame_key = df, key
        df = self._frame.copy()
        df.attrs["instructions_total"] = self.instructions_total
        df.attrs["dropped"] = self.dropped
        return df

    def _rows(self, include_entries: bool) -> Iterator[TraceEvent]:
        """The events to_dataframe shows (entries made into TraceEvents on the fly)."""
        for item in self._log:
            if type(item) is tuple:
                if include_entries:
                    yield _entry_event(item)
            else:
                item = _made(item)
                if include_entries or item.event == "exit":
                    yield item

    def _repr_html_(self) -> str:
        df = self.to_dataframe()
        head = f"<p><b>{len(df)} VM exits</b>, {self.instructions_total:,} guest instructions</p>"
        if self.dropped:
            head += f"<p>(the {self.dropped:,} oldest events were dropped: max_events={self.max_events:,})</p>"
        if df.empty:
            return head
        show = df[["seq", "reason", "reason_number", "guest_rip", "instruction", "qualification", "handler"]].copy()
        show["guest_rip"] = show["guest_rip"].map(hex)
        show["qualification"] = show["qualification"].map(hex)
        return head + show.tail(20).to_html(index=False)

    def __repr__(self) -> str:
        return f"<Trace: {len(self)} exits, {self.instructions_total:,} guest instructions>"
