"""The error boundary, without a server: how each server's refusals are read (texts as Redis
7.0.15 and Valkey 9.1 word them), the scripts' own codes, and the group codes (BUSYGROUP from
fakeredis, which words it as Redis does)."""

from __future__ import annotations

import fakeredis
import pytest
import redis.exceptions

from streamstore import (
    BackpressureError,
    PermissionDeniedError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
)
from streamstore.errors import (
    GroupExistsError,
    GroupMissingError,
    ServerError,
    name_script,
    permission_denied,
    script_refusal,
    translate_redis_errors,
)

SHA = "4866e50f1c55280d7667fcfe10891bcb15fde56b"


@pytest.mark.parametrize(
    ("text", "command", "script"),
    [
        ("this user has no permissions to run the 'xadd' command", "XADD", None),  # Redis 7.0
        ("User producer has no permissions to run the 'xtrim' command", "XTRIM", None),  # Valkey
        (
            "ERR ACL failure in script: User prod has no permissions to run the 'set' command "
            "script: on @user_script:1.",
            "SET",
            None,
        ),
        (  # Redis 7.0 names no command inside a script, only the script's hash
            "ERR The user executing the script can't run this command or subcommand script: "
            f"{SHA}, on @user_script:1.",
            None,
            "publish",
        ),
        ("this user has no permissions to run the 'acl|dryrun' command", "ACL DRYRUN", None),
    ],
)
def test_acl_refusals_name_the_user_the_command_and_the_script(
    text: str, command: str | None, script: str | None
) -> None:
    name_script(SHA, "publish", "producer")
    error = permission_denied(text, user="subscriber")
    assert isinstance(error, PermissionDeniedError)
    assert isinstance(error, ServerError)
    assert isinstance(error, PermissionError)
    assert (error.user, error.command, error.script) == ("subscriber", command, script)
    assert str(error).startswith("Redis user 'subscriber' may not run ")
    assert SHA not in str(error)
    if script is not None:
        assert "in the publish script; this is the producer role's work" in str(error)


def test_a_refusal_is_translated_wherever_it_comes_from() -> None:
    refusal = redis.exceptions.NoPermissionError(
        "this user has no permissions to run the 'xadd' command"
    )
    with pytest.raises(PermissionDeniedError, match="may not run XADD"), translate_redis_errors():
        raise refusal


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (
            "NOGROUP No such key 'f' or consumer group 'g' in XREADGROUP with GROUP option",
            GroupMissingError,
        ),
        (  # redis-py's cluster pipeline wording of the same reply
            "Command # 1 (XREADGROUP GROUP g c COUNT 5 STREAMS f >) of pipeline caused error: "
            "NOGROUP No such key 'f' or consumer group 'g' in XREADGROUP with GROUP option",
            GroupMissingError,
        ),
        ("BUSYGROUP Consumer Group name already exists", GroupExistsError),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", ServerError),
    ],
)
def test_group_replies_are_told_apart_by_their_code(text: str, kind: type[ServerError]) -> None:
    with pytest.raises(kind) as caught, translate_redis_errors():
        raise redis.exceptions.ResponseError(text)
    assert type(caught.value) is kind


async def test_creating_an_existing_group_is_group_exists_on_fakeredis() -> None:
    client = fakeredis.FakeAsyncRedis()
    await client.xgroup_create("feed", "g", id="0", mkstream=True)
    with pytest.raises(GroupExistsError), translate_redis_errors():
        await client.xgroup_create("feed", "g", id="0", mkstream=True)
    await client.aclose()


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        ("SSNOSESSION", SessionNotFoundError),
        ("SSCLOSED deleted", SessionClosedError),
        ("SSEXISTS", SessionExistsError),
        ("SSBACKPRESSURE", BackpressureError),
    ],
)
def test_the_scripts_codes_map_to_the_error_tree(reply: str, kind: type[Exception]) -> None:
    error = script_refusal(reply, "s1")
    assert type(error) is kind
    assert "s1" in str(error)
    if isinstance(error, SessionClosedError):
        assert error.state == "deleted"


def test_other_replies_are_not_script_refusals() -> None:
    assert script_refusal("ERR unknown command", "s1") is None
    assert script_refusal("SSWRONGTYPE the partition feed refused the entry", "s1") is None
