"""The actor runtime: one message at a time, ask/tell, and a clean stop."""

from __future__ import annotations

import asyncio

import pytest

from eventq.actors.runtime import Actor, ActorStopped


class Slow(Actor[str]):
    name = "slow"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.release = asyncio.Event()

    async def receive(self, message: str) -> str:
        self.seen.append(message)
        if message == "block":
            await self.release.wait()
        if message == "boom":
            raise ValueError("bad message")
        return message.upper()


async def test_messages_are_handled_one_at_a_time_in_order() -> None:
    actor = Slow()
    actor.start()
    actor.tell("a")
    first = asyncio.ensure_future(actor.ask("block"))
    second = asyncio.ensure_future(actor.ask("b"))
    await asyncio.sleep(0.01)
    assert actor.seen == ["a", "block"], "b waits until block is answered"
    actor.release.set()
    assert await first == "BLOCK" and await second == "B"
    await actor.stop()


async def test_a_failing_message_fails_its_ask_and_the_actor_goes_on() -> None:
    actor = Slow()
    actor.start()
    with pytest.raises(ValueError, match="bad message"):
        await actor.ask("boom")
    assert await actor.ask("ok") == "OK"
    await actor.stop()


async def test_stopping_fails_every_pending_ask_with_a_clear_error() -> None:
    actor = Slow()
    actor.start()
    in_flight = asyncio.ensure_future(actor.ask("block"))
    queued = asyncio.ensure_future(actor.ask("later"))
    await asyncio.sleep(0.01)
    await actor.stop()
    for pending in (in_flight, queued):
        with pytest.raises(ActorStopped, match="actor slow stopped"):
            await pending
    with pytest.raises(ActorStopped):
        await actor.ask("after")


async def test_an_actor_is_idle_only_with_no_message_in_hand_and_none_queued() -> None:
    """A step taken while ``idle`` cannot overtake a message sent before it, nor run inside
    one suspended at an await."""
    actor = Slow()
    assert not actor.idle(), "not started: nothing would ever answer"
    actor.start()
    await asyncio.sleep(0)
    assert actor.idle()
    actor.tell("a")
    assert not actor.idle(), "sent and not yet taken"
    await asyncio.sleep(0.01)
    assert actor.idle()
    in_hand = asyncio.ensure_future(actor.ask("block"))
    await asyncio.sleep(0.01)
    assert actor.seen == ["a", "block"] and not actor.idle(), "taken, suspended in its handler"
    queued = asyncio.ensure_future(actor.ask("later"))
    actor.release.set()
    assert await in_hand == "BLOCK" and await queued == "LATER"
    await asyncio.sleep(0)
    assert actor.idle()
    await actor.stop()
    assert not actor.idle(), "stopped"
