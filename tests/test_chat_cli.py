"""`tfglm chat` (a terminal session, or --message turns) and `tfglm generate --stream`, on a tiny chat run that
remembers a name told earlier in the conversation."""

import json
import logging
import os
import sys

import pexpect
import pytest
import tensorflow as tf

from conftest import TINY
from tfglm.cli import main
from tfglm.config import generate_settings
from tfglm.generation.chat import ChatSession
from tfglm.tasks.registry import load_run

GREEDY = ["--temperature", "0"]


@pytest.fixture(scope="module")
def generator(chat_run):
    run = load_run(chat_run)
    return run.task.generator(run.model)


def _reply(generator, *messages):
    """`Generator.chat`'s greedy reply to the conversation `messages` (user and assistant in turn)."""
    roles = [["user", "assistant"][i % 2] for i in range(len(messages))]
    out = generator.chat(tf.constant([roles]), tf.constant([list(messages)]), 16, 0.0, 0, 1.0, 0)
    return out["completions"].numpy()[0].decode()


def test_message_turns_keep_the_history(chat_run, generator, capsys):
    assert main(["chat", "--model", chat_run, "--message", "what is your name?", *GREEDY]) == 0
    assert capsys.readouterr().out == "i am tfglm\n"
    name = "bob"
    assert main(["chat", "--model", chat_run, "--message", f"my name is {name}", "--message", "what is my name?",
                 "--json", *GREEDY]) == 0
    told, asked = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert told == {"message": f"my name is {name}", "reply": f"hi {name}", "num_tokens": len(name) + 3}
    assert asked["reply"] == name == _reply(generator, f"my name is {name}", f"hi {name}", "what is my name?")
    assert main(["chat", "--model", chat_run, "--message", "what is my name?", *GREEDY]) == 0
    assert capsys.readouterr().out == "i do not know\n"


def test_a_conversation_longer_than_the_context_forgets_its_oldest_turns_with_one_warning(chat_run, generator,
                                                                                           caplog):
    run = load_run(chat_run)
    session = ChatSession(generator, "", generate_settings(run.config))
    with caplog.at_level(logging.WARNING, logger="tfglm"):
        replies = [session.reply(message)[0] for message in ("my name is bob", "what is my name?", "how are you?",
                                                             "what is your name?")]
    assert replies[:2] == ["hi bob", "bob"]
    assert caplog.text.count("the conversation outgrew the context (64 tokens minus 16 new)") == 1
    roles, contents = session.conversation()
    tokens = generator.tokenizer.encode_chat(tf.constant(roles), tf.constant(contents), 64)[0].row_lengths()
    assert contents[0][0] != "my name is bob" and int(tokens[0]) <= 64 - 16


def test_a_streamed_reply_is_the_whole_reply_and_a_stopped_one_stays_as_far_as_it_was_shown(chat_run, generator,
                                                                                            monkeypatch):
    settings = generate_settings(load_run(chat_run).config)
    whole = ChatSession(generator, "", settings)
    assert "".join(whole.stream("what is your name?")) == "i am tfglm"
    assert whole.turns == [("user", "what is your name?"), ("assistant", "i am tfglm")]
    stopped = ChatSession(generator, "", settings)
    pieces = stopped.stream("what is your name?")
    first = next(pieces)
    pieces.close()
    assert first and "i am tfglm".startswith(first) and first != "i am tfglm"
    assert stopped.turns == [("user", "what is your name?"), ("assistant", first)]

    def interrupted(*args, **kwargs):  # Ctrl-C before the first piece: the question is forgotten
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(generator, "stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(stopped.stream("hi"))
    assert stopped.turns == [("user", "what is your name?"), ("assistant", first)]


def test_generate_stream_prints_what_generate_prints(chat_run, capsys):
    # The starts of replies (a chat model learns the assistant's text only), one at a time, as --stream runs them: a
    # batch has other shapes.
    for prompt in ("see you", "i am"):
        assert main(["generate", "--model", chat_run, "--prompt", prompt, *GREEDY]) == 0
        whole = capsys.readouterr().out
        assert main(["generate", "--model", chat_run, "--prompt", prompt, "--stream", *GREEDY]) == 0
        assert capsys.readouterr().out == whole and len(whole.splitlines()[0]) > len(prompt)


def test_terminal_session_remembers_resets_and_exits(chat_run):
    child = pexpect.spawn(sys.executable, ["-m", "tfglm.cli", "chat", "--model", chat_run, *GREEDY],
                          env={**os.environ, "TERM": "dumb"}, encoding="utf-8", timeout=240)
    try:
        def turn(message):
            child.expect_exact("you> ")
            child.sendline(message)
            child.expect(r"assistant> (.*?)\r\n")
            return child.match.group(1)

        assert turn("my name is bob") == "hi bob"
        assert turn("what is my name?") == "bob"
        child.expect_exact("you> ")
        child.sendintr()  # Ctrl-C at the prompt: a new prompt, the session goes on
        child.sendline("/reset")
        child.expect_exact("(new conversation)")
        assert turn("what is my name?") == "i do not know"
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_user_mistakes_are_one_line(tmp_path, chat_run, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefgh\n" * 300)
    sets = [a for s in TINY + ["train.steps=20"] for a in ("--set", s)]
    assert main(["train", *sets, "--data", str(corpus), "--out", str(tmp_path / "lm")]) == 0
    capsys.readouterr()
    for argv, message in [
        (["chat", "--model", str(tmp_path / "lm"), "--message", "hi"], "a causal_lm run, without the chat template"),
        (["chat", "--model", chat_run, "--json"], "--json: prints the replies to --message turns"),
        (["chat", "--model", chat_run, "--message", "hi", "--max-new-tokens", "64"], "generate.max_new_tokens"),
        (["generate", "--model", chat_run, "--stream", "--json"], "--stream prints text as it comes"),
    ]:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("tfglm: error: ") and message in err, err


def test_input_file_conversations_are_answered_in_batches_a_line_each(chat_run, tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    rows = [{"question": "what is your name?"}, {"question": "bye"},
            {"messages": [{"role": "user", "content": "my name is eve"}, {"role": "assistant", "content": "hi eve"},
                          {"role": "user", "content": "what is my name?"}]},
            {"question": "how are you?"}, {"question": "hi"}]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "replies.jsonl"
    assert main(["chat", "--model", chat_run, "--input", str(questions), "--output", str(out), "--batch-size", "2",
                 *GREEDY]) == 0
    with open(out) as f:
        answered = [json.loads(line) for line in f]
    assert [row["messages"][-1] for row in answered] == [
        {"role": "assistant", "content": reply} for reply in ("i am tfglm", "see you soon", "eve", "fine, thanks",
                                                              "hello there")]
    assert answered[2]["messages"][:3] == rows[2]["messages"]
    assert answered[0]["messages"][0] == {"role": "user", "content": "what is your name?"}
    assert [row["num_tokens"] for row in answered] == [len(row["messages"][-1]["content"]) for row in answered]

    table = tmp_path / "questions.csv"
    table.write_text("question\nbye\nhi\n")
    assert main(["chat", "--model", chat_run, "--input", str(table), *GREEDY]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["messages"][-1]["content"] for row in printed] == ["see you soon", "hello there"]


def test_input_file_mistakes_are_one_line_and_leave_an_earlier_output_intact(chat_run, tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "hi"}\n{"messages": [{"role": "user", "content": "hi"}, '
                         '{"role": "assistant", "content": "hello there"}]}\n')
    out = tmp_path / "replies.jsonl"
    out.write_text("earlier\n")
    for argv, message in [
        (["--input", str(questions), "--output", str(out)],
         f"{questions}:2: the conversation's last message is the assistant's; expected the user's turn to answer"),
        (["--input", str(questions), "--message", "hi"], "--input answers a file of independent conversations"),
        (["--output", str(out)], "--output: holds the replies to --input; give --input"),
        (["--input", str(questions), "--output", str(tmp_path / "r.txt")], "r.txt: expected a .jsonl file"),
        (["--input", str(questions), "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--input", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
    ]:
        code = main(["chat", "--model", chat_run, *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("tfglm: error: ") and message in err, err
    assert out.read_text() == "earlier\n"
