"""Tests for klock_async.marc: the seeded lost-edit simulation and its table."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from klock_async.marc import (
    COLUMNS,
    Edit,
    Mode,
    ModeResult,
    Repo,
    Scenario,
    explain_columns,
    format_table,
    plan,
    run_all,
    run_mode,
    verdict,
)

SMALL = {"agents": 4, "files": 2, "edits": 4}
SEEDS = [pytest.param(seed, id=f"seed-{seed}") for seed in range(4)]


def expected_markers(scenario: Scenario) -> dict[str, Counter[str]]:
    """Marker lines each file must hold when no edit is lost."""
    markers: dict[str, Counter[str]] = {path: Counter() for path in scenario.paths}
    for edits in plan(scenario).values():
        for edit in edits:
            markers[edit.path][edit.marker] += 1
    return markers


# --- the plan ------------------------------------------------------------------------------------


def test_plan_is_determined_by_the_seed() -> None:
    """The same scenario always yields the same plan; another seed yields another one."""
    scenario = Scenario(agents=5, files=3, edits=6, seed=7)
    assert plan(scenario) == plan(Scenario(agents=5, files=3, edits=6, seed=7))
    assert plan(scenario) != plan(Scenario(agents=5, files=3, edits=6, seed=8))


def test_plan_shape() -> None:
    """Every agent plans its edits on the scenario's files, with bounded think times."""
    scenario = Scenario(agents=3, files=4, edits=10, seed=1, think_min=0.001, think_max=0.002)
    plans = plan(scenario)
    assert tuple(plans) == scenario.agent_ids == ("agent-00", "agent-01", "agent-02")
    edits = [edit for agent_edits in plans.values() for edit in agent_edits]
    assert len(edits) == scenario.intended == 30
    assert len({edit.marker for edit in edits}) == 30
    assert {edit.path for edit in edits} <= set(scenario.paths)
    assert all(0.001 <= edit.think <= 0.002 for edit in edits)
    assert plans["agent-01"][3].marker == "# agent-01 edit 3"


def test_agent_plans_do_not_depend_on_the_number_of_agents() -> None:
    """Adding agents leaves the plans of the existing ones unchanged."""
    few = plan(Scenario(agents=2, files=3, edits=4, seed=3))
    many = plan(Scenario(agents=5, files=3, edits=4, seed=3))
    assert {agent: many[agent] for agent in few} == few


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"agents": 0}, "agents must be at least 1", id="no-agents"),
        pytest.param({"files": 0}, "files must be at least 1", id="no-files"),
        pytest.param({"edits": -1}, "edits must be at least 1", id="negative-edits"),
        pytest.param({"agents": 2.0}, "agents must be an integer", id="float-agents"),
        pytest.param({"seed": True}, "seed must be an integer", id="bool-seed"),
        pytest.param({"think_min": -0.1}, "think_min must be a finite", id="negative-think"),
        pytest.param({"think_max": float("inf")}, "think_max must be a finite", id="inf-think"),
        pytest.param({"think_max": "1"}, "think_max must be a number", id="str-think"),
        pytest.param({"think_min": 0.5, "think_max": 0.1}, "must not be below", id="unordered"),
    ],
)
def test_bad_scenario_is_refused(fields: dict[str, Any], message: str) -> None:
    """A scenario with a bad size, seed or think time raises ValueError saying which."""
    with pytest.raises(ValueError, match=message):
        Scenario(**fields)


# --- the five modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_only_causal_checks_the_global_lock_and_declared_edits_lose_nothing(
    seed: int,
) -> None:
    """Modes 1 and 2 lose edits; SERIALIZABLE sessions, the lock and declared edits lose none."""
    scenario = Scenario(seed=seed, **SMALL)
    results = {r.mode: r for r in await run_all(scenario)}
    assert list(results) == list(Mode)
    assert all(r.intended == 16 for r in results.values())
    assert results[Mode.NO_COORDINATION].lost >= 1
    assert results[Mode.PER_CALL_LEASES].lost >= 1
    assert results[Mode.SERIALIZABLE].lost == 0
    assert results[Mode.GLOBAL_LOCK].lost == 0
    assert results[Mode.DECLARED_UP_FRONT].lost == 0
    # Mode 3 lost nothing because it refused stale writes and redid those edits.
    assert results[Mode.SERIALIZABLE].causal_violations >= 1
    assert results[Mode.SERIALIZABLE].redone == results[Mode.SERIALIZABLE].causal_violations
    for mode in (Mode.NO_COORDINATION, Mode.PER_CALL_LEASES, Mode.GLOBAL_LOCK):
        assert results[mode].causal_violations == 0
        assert results[mode].redone == 0
    for mode in (Mode.NO_COORDINATION, Mode.GLOBAL_LOCK):
        assert results[mode].deaths == 0  # no kernel


@pytest.mark.parametrize("seed", SEEDS)
async def test_declared_edits_redo_nothing(seed: int) -> None:
    """Mode 5 holds each file from the read through the write: no write refused, none redone."""
    result = await run_mode(Mode.DECLARED_UP_FRONT, Scenario(seed=seed, **SMALL))
    assert (result.lost, result.redone, result.causal_violations) == (0, 0, 0)


async def test_progress_reports_every_finished_edit() -> None:
    """The progress callback hears the start of each mode (0), then each finished edit."""
    scenario = Scenario(**SMALL)
    calls: list[tuple[Mode, int]] = []
    await run_all(scenario, progress=lambda mode, done: calls.append((mode, done)))
    for mode in Mode:
        counts = [done for m, done in calls if m is mode]
        assert counts == list(range(scenario.intended + 1)), mode
    assert [m for m, done in calls if done == 0] == list(Mode)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(Mode.SERIALIZABLE, id="serializable"),
        pytest.param(Mode.GLOBAL_LOCK, id="global-lock"),
        pytest.param(Mode.DECLARED_UP_FRONT, id="declared-up-front"),
    ],
)
async def test_safe_modes_keep_every_marker_exactly_once(mode: Mode, seed: int) -> None:
    """Every planned marker ends up once in its own file, after the untouched header."""
    scenario = Scenario(seed=seed, **SMALL)
    repo = Repo(scenario.paths)
    result = await run_mode(mode, scenario, repo=repo)
    assert result.lost == 0
    snapshot = repo.snapshot()
    for path, markers in expected_markers(scenario).items():
        assert snapshot[path][0] == f"# {path}"
        assert Counter(snapshot[path][1:]) == markers


async def test_global_lock_run_is_reproducible() -> None:
    """Under the global lock the agents take turns, so a seed gives the same files every run."""
    scenario = Scenario(agents=3, files=2, edits=3, seed=5)
    first, second = Repo(scenario.paths), Repo(scenario.paths)
    await run_mode(Mode.GLOBAL_LOCK, scenario, repo=first)
    await run_mode(Mode.GLOBAL_LOCK, scenario, repo=second)
    assert first.snapshot() == second.snapshot()


async def test_single_agent_loses_nothing_in_any_mode() -> None:
    """With one agent there is no race: no mode loses, redoes, dies or refuses anything."""
    scenario = Scenario(agents=1, files=2, edits=3, seed=2)
    for result in await run_all(scenario):
        assert (result.lost, result.redone, result.deaths, result.causal_violations) == (0,) * 4


async def test_run_mode_needs_the_scenario_files() -> None:
    """A repository without the scenario's files is refused by the tool call."""
    with pytest.raises(ExceptionGroup) as info:
        await run_mode(Mode.NO_COORDINATION, Scenario(**SMALL), repo=Repo(["other.py"]))
    assert info.group_contains(KeyError)


# --- the table ------------------------------------------------------------------------------------


def result(mode: Mode, lost: int, makespan: float, redone: int = 0, deaths: int = 0) -> ModeResult:
    return ModeResult(
        mode=mode,
        intended=40,
        lost=lost,
        makespan=makespan,
        redone=redone,
        deaths=deaths,
        causal_violations=redone,
    )


RESULTS = [
    result(Mode.NO_COORDINATION, 10, 0.1),
    result(Mode.PER_CALL_LEASES, 9, 0.1, deaths=2),
    result(Mode.SERIALIZABLE, 0, 0.25, redone=7, deaths=3),
    result(Mode.GLOBAL_LOCK, 0, 1.0),
    result(Mode.DECLARED_UP_FRONT, 0, 0.2, deaths=5),
]


def test_lost_percent() -> None:
    """lost_percent is the share of intended edits that were lost, in percent."""
    assert result(Mode.NO_COORDINATION, 10, 0.1).lost_percent == 25.0
    assert result(Mode.SERIALIZABLE, 0, 0.1).lost_percent == 0.0


def test_table_lists_every_mode_with_makespan_relative_to_the_global_lock() -> None:
    """The table has a header, a rule and one aligned row per mode."""
    lines = format_table(RESULTS).splitlines()
    cells = [re.split(r" {2,}", line.strip()) for line in lines]
    assert cells[0] == [
        "mode",
        "intended",
        "lost",
        "lost %",
        "makespan",
        "vs mode 4",
        "redone",
        "deaths",
        "violations",
    ]
    assert set(lines[1]) == {"-", " "}
    assert len({len(line) for line in lines}) == 1
    assert cells[2] == [
        "1. no coordination",
        "40",
        "10",
        "25.0 %",
        "0.100 s",
        "0.10x",
        "0",
        "0",
        "0",
    ]
    assert cells[3][-3:] == ["0", "2", "0"]
    assert cells[4][-3:] == ["7", "3", "7"]
    assert "0.250 s" in lines[4] and "0.25x" in lines[4] and lines[4].startswith("3. SERIAL")
    assert "1.00x" in lines[5]
    assert cells[6] == [
        "5. edits declared up front",
        "40",
        "0",
        "0.0 %",
        "0.200 s",
        "0.20x",
        "0",
        "5",
        "0",
    ]


def test_every_column_is_explained() -> None:
    """explain_columns() says what each column after ``mode`` means, in table order."""
    header = re.split(r" {2,}", format_table(RESULTS).splitlines()[0].strip())
    explained = [re.split(r" {2,}", line.strip())[0] for line in explain_columns().splitlines()]
    assert [name for name, _ in COLUMNS] == explained
    assert [c for c in header[1:] if c != "lost %"] == explained


def test_table_without_baseline_shows_a_dash() -> None:
    """Without a global-lock row there is nothing to compare makespans with."""
    line = format_table(RESULTS[:2]).splitlines()[2]
    assert " - " in line


def test_verdict_summarises_loss_and_speed() -> None:
    """The verdict names the worst loss, the loss and redone edits of modes 3 and 5, the speed."""
    text = verdict(RESULTS)
    assert "up to 10 of 40 edits (25 %) vanished" in text
    assert (
        "with SERIALIZABLE sessions no edit was lost, 7 redone, 4.0x faster than one global lock"
        in text
    )
    assert (
        "with edits declared up front no edit was lost and none redone, 5.0x faster than one "
        "global lock" in text
    )
    assert "\n" not in text


def test_verdict_says_no_edit_vanished_when_nothing_was_lost() -> None:
    """When modes 1 and 2 lost nothing the verdict says so, not "up to 0 of N edits (0 %)"."""
    text = verdict([result(Mode.NO_COORDINATION, 0, 0.1), result(Mode.PER_CALL_LEASES, 0, 0.1)])
    assert text == "without causal checks no edit vanished."


def test_verdict_counts_lost_edits_of_a_safe_mode() -> None:
    """A safe mode that lost edits is reported with the count, never as "no edit was lost"."""
    text = verdict([result(Mode.SERIALIZABLE, 3, 1.0, redone=2)])
    assert text == "with SERIALIZABLE sessions 3 edits were lost, 2 redone."


def test_edit_is_a_frozen_value() -> None:
    """Planned edits cannot be changed after planning."""
    edit = Edit("src/a.py", 0.1, "# m")
    with pytest.raises(AttributeError):
        edit.think = 0.2  # type: ignore[misc]


def test_verdict_says_slower_when_the_global_lock_wins() -> None:
    """When every edit hits one file, the verdict says how much slower mode 3 was."""
    text = verdict([result(Mode.SERIALIZABLE, 0, 2.0), result(Mode.GLOBAL_LOCK, 0, 1.0)])
    assert text == (
        "with SERIALIZABLE sessions no edit was lost and none redone, 2.0x slower than one "
        "global lock."
    )
