"""Chat layouts: a tokenizer's own chat template (Hugging Face's Jinja) for training on conversations
and answering them, fax's layout otherwise."""

import json

import numpy as np
import pytest

from fax.data.chat import END_OF_TURN, FAX_LAYOUT, TemplateError, TemplateLayout, layout
from fax.data import PROMPT_FLAG, HFTokenizer, TokenDataset, prepare

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
# Qwen's layout (ChatML), with a default system message
CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama 3's layout, with its checks and Hugging Face's {% generation %} marks
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
          "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{% if message['role'] == 'assistant' %}"
          "{% generation %}{{ message['content'] | trim }}<|eot_id|>{% endgeneration %}"
          "{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Mistral's layout: no system role, no assistant header, roles checked
ALTERNATING = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
               "{% else %}{{ message['content'] }}</s>{% endif %}{% endfor %}")
TALK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo "}, {"role": "user", "content": "?"},
        {"role": "assistant", "content": "!"}]


def chat_tokenizer(folder, template: str | None, corpus=("hello there, how are you",)) -> HFTokenizer:
    """A byte-level BPE tokenizer with chat special tokens, saved the Hugging Face way: tokenizer.json
    and, with a template, a tokenizer_config.json that transformers' AutoTokenizer loads as well."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    if template is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
            "bos_token": "<|begin_of_text|>"}))
    return HFTokenizer(folder / "tokenizer.json")


@pytest.mark.parametrize("template, end, replies", [(CHATML, "<|im_end|>", ["yo <|im_end|>", "!<|im_end|>"]),
                                                    (LLAMA3, "<|eot_id|>", ["yo<|eot_id|>", "!<|eot_id|>"])],
                         ids=["chatml", "llama3"])
def test_a_tokenizers_template_lays_out_conversations_as_transformers_does(tmp_path, template, end, replies):
    """The pieces of a conversation join into the text (and tokens) transformers' apply_chat_template
    gives, with or without the assistant's header after it; exactly the assistants' messages and the
    ends of their turns are trained on (Hugging Face's own assistant mask, where the template marks
    it); a reply ends at the end-of-turn token, not at a stop string its decoded text would lack."""
    transformers = pytest.importorskip("transformers")
    tok = chat_tokenizer(tmp_path, template)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    chat = layout(tok)
    assert isinstance(chat, TemplateLayout) and chat.end_ids == (tok.token_id(end),)
    assert chat.reply_stops(["x"]) == ("x",)
    for talk in (TALK, TALK[1:], TALK[1:2]):
        for reply in (False, True):
            text = "".join(t for t, _ in chat.pieces(talk, reply))
            assert text == hf.apply_chat_template(talk, tokenize=False, add_generation_prompt=reply)
        assert chat.prompt_ids(tok.encode, talk) == hf.apply_chat_template(talk, add_generation_prompt=True,
                                                                                return_dict=True)["input_ids"]
    trained = [t for t, said in chat.pieces(TALK) if said]
    assert trained == replies
    if "{% generation %}" in template:
        marked = hf.apply_chat_template(TALK, return_assistant_tokens_mask=True, return_dict=True)
        ids = np.array(marked["input_ids"])[np.array(marked["assistant_masks"], bool)]
        assert list(ids) == [int(i) for text in trained for i in tok.encode(text)]


def test_without_a_template_conversations_take_faxs_layout(tmp_path):
    assert layout(chat_tokenizer(tmp_path, None)) is FAX_LAYOUT
    assert FAX_LAYOUT.end_ids == () and FAX_LAYOUT.reply_stops(["x"]) == ("x", END_OF_TURN)


def test_templates_that_fax_cannot_split_or_that_refuse_a_conversation_say_so(tmp_path):
    """A template's own refusals (raise_exception) come back with its message; one that rewrites earlier
    text as messages are added (so the assistant's tokens cannot be told apart) is named as such; the
    sandbox keeps a template from reaching Python's internals."""
    def chat(template: str) -> TemplateLayout:
        return TemplateLayout(template, {}, lambda _: None)

    alternating = chat(ALTERNATING)
    assert alternating.end_of_turn == "</s>" and alternating.reply_stops([]) == ("</s>",)  # not one token here
    assert [t for t, said in alternating.pieces(TALK[1:3]) if said] == ["yo </s>"]
    with pytest.raises(TemplateError, match=r"refuses the conversation: Conversation roles must alternate"):
        alternating.pieces(TALK[1:2] * 2)
    only_the_last = chat("{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(TemplateError, match="changes the text before message 1"):
        only_the_last.pieces(TALK[1:3])
    escape = chat("{{ cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "owned") + "') }}")
    with pytest.raises(TemplateError, match="chat template fails"):
        escape.pieces(TALK)
    assert not (tmp_path / "owned").exists()
    with pytest.raises(TemplateError, match="does not parse"):
        chat("{% for m in messages %}")


def test_prepare_lays_conversations_out_with_the_tokenizers_template_and_keeps_it(tmp_path):
    """fax prepare --tokenizer DIR/tokenizer.json --messages-field: the dataset keeps the template
    beside its copy of the tokenizer, its tokens are the template's, and only the assistant's reply
    and the end of its turn are trained on (not flagged). A changed template tokenizes anew."""
    tok = chat_tokenizer(tmp_path / "hf", CHATML)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": TALK[1:3]}) + "\n")
    prepare([tmp_path / "chat.jsonl"], tmp_path / "data", tokenizer=str(tmp_path / "hf" / "tokenizer.json"),
            messages_field="messages")
    assert (tmp_path / "data" / "tokenizer_config.json").read_text() == (tmp_path / "hf" / "tokenizer_config.json"
                                                                          ).read_text()
    tokens = np.asarray(TokenDataset.open(tmp_path / "data").tokens)
    ids, context = tokens & ~np.uint32(PROMPT_FLAG), (tokens & np.uint32(PROMPT_FLAG)) != 0

    def text(mask) -> str:
        return tok.tok.decode([int(i) for i in ids[mask]], skip_special_tokens=False)

    assert text(~context) == "yo <|im_end|><|endoftext|>"
    assert text(context) == "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                            "<|im_start|>assistant\n\n"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3}))
    prepare([tmp_path / "chat.jsonl"], tmp_path / "data", tokenizer=str(tmp_path / "hf" / "tokenizer.json"),
            messages_field="messages")
    ids = np.asarray(TokenDataset.open(tmp_path / "data").tokens) & ~np.uint32(PROMPT_FLAG)
    assert tok.tok.decode([int(i) for i in ids], skip_special_tokens=False).startswith("<|start_header_id|>user")


def test_a_run_tuned_with_a_template_replies_in_it_and_stops_at_its_end_of_turn_token(tmp_path, capsys):
    """Conversations prepared with a Llama-3-style template train a model; the run keeps the template,
    and its engine, asked in that layout (what /v1/chat/completions and fax generate --chat send), gives
    the reply it was taught and stops at <|eot_id|>, which ends a reply without being one of its tokens;
    `fax export` writes the tokenizer and its template beside the weights; a conversation the template
    refuses is a clear error (in `fax infer`, that row's)."""
    from fax import Trainer, load_config
    from fax.cli import main
    from fax.serving.infer import InferSettings, infer
    from fax.serving.batching import generate
    from fax.serving.engine import Engine
    from fax.serving.sampling import SamplingParams

    taught = {"hello": "hi there", "bye": "see you"}
    tok = chat_tokenizer(tmp_path / "hf", LLAMA3, corpus=[*taught, *taught.values()])
    rng = np.random.default_rng(0)
    talks = [[{"role": "user", "content": asked}, {"role": "assistant", "content": taught[asked]}]
             for asked in rng.choice(list(taught), 300)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": t}) + "\n" for t in talks))
    prepare([tmp_path / "chat.jsonl"], tmp_path / "data", tokenizer=str(tmp_path / "hf" / "tokenizer.json"),
            messages_field="messages")
    Trainer(load_config(overrides=["model=gpt-tiny", f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'data'}",
                                   "train.steps=150", "train.batch_size=16", "train.seq_len=32", "optim.lr=3e-3",
                                   "train.sample_tokens=0"]), echo=lambda _: None).fit()
    assert (tmp_path / "run" / "tokenizer_config.json").exists()
    engine = Engine.from_run_dir(tmp_path / "run")
    assert engine.end_ids == (tok.eos_id, tok.token_id("<|eot_id|>"))
    chat = layout(tok)
    for asked, reply in taught.items():
        prompt = chat.prompt_ids(tok.encode, [{"role": "user", "content": asked}])
        assert generate(engine, [prompt], [SamplingParams(max_new_tokens=20, temperature=0.0)])[0] == list(
            tok.encode(reply))
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "bye", "--chat", "--max-tokens", "20",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "see you\n"
    transformers = pytest.importorskip("transformers")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")  # the tokenizer and its template
    talk = [{"role": "user", "content": "bye"}]
    assert exported.apply_chat_template(talk, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        chat.prompt_ids(tok.encode, talk)
    # a template that refuses some conversations: in `fax infer` each refusal is its row's error, the rest answered
    (tmp_path / "run" / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% if messages | length > 1 %}{{ raise_exception('one message at a time') }}{% endif %}" + LLAMA3),
        "eos_token": "<|endoftext|>", "bos_token": "<|begin_of_text|>"}))
    rows = [[{"role": "user", "content": "bye"}], [{"role": "user", "content": "hello"}] * 2]
    (tmp_path / "talks.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    infer(tmp_path / "run", tmp_path / "talks.jsonl", tmp_path / "replies.jsonl",
          InferSettings(max_tokens=20, temperature=0.0, messages_field="messages"), engine="local")
    answered, refused = (json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines())
    assert (answered["completion"], answered["error"]) == ("see you", None)
    assert refused["completion"] is None and "one message at a time" in refused["error"]
    (tmp_path / "run" / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ raise_exception('a system message comes first') }}"}))
    assert main(["generate", str(tmp_path / "run"), "--prompt", "bye", "--chat"]) == 2
    assert "refuses the conversation: a system message comes first" in capsys.readouterr().err


def test_a_chat_request_the_template_refuses_gets_its_reason_as_a_400(tmp_path):
    from fax import models
    from fax.config import ServeConfig
    from fax.serving.requests import RequestError, parse_chat

    tok = chat_tokenizer(tmp_path, ALTERNATING)
    body = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(RequestError, match="roles must alternate") as refused:
        parse_chat(body, tok.encode, ServeConfig(), models.preset("gpt-tiny"), "m", layout(tok))
    assert refused.value.status == 400 and refused.value.param == "messages"
    body["messages"].pop()
    completion = parse_chat(body, tok.encode, ServeConfig(), models.preset("gpt-tiny"), "m", layout(tok))
    assert completion.prompt == list(tok.encode("[INST] a [/INST]")) and completion.sampling.stop == ("</s>",)
