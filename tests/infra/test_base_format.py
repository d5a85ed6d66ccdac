"""Base models (LLaMA-2 and its kind) have no chat template, an EOS that is not ChatML's `<|im_end|>`, and no pad
token. The kit gives them a format whose assistant turn ends with their EOS: labels end with it, padding does not
hide it, and generation stops at it. `smollm2-135m-as-base` is the embedded model dressed that way."""

import pytest

from humpback_nb.config import GenerateConfig, ModelConfig, TrainConfig
from humpback_nb.infra.chat import BASE_TEMPLATE, turn_end_ids
from humpback_nb.infra.engines import LocalEngine
from humpback_nb.infra.models import embedded_checkpoint, load_tokenizer, load_trained
from humpback_nb.method.curate import parse_score
from humpback_nb.method.prompts import forward_messages
from humpback_nb.method.train import IGNORE_INDEX, backward_example, forward_example, pad_batch, train_model

BASE = "smollm2-135m-as-base"


@pytest.fixture(scope="module")
def base_tokenizer():
    return load_tokenizer(BASE)


def test_the_base_variant_looks_like_a_base_model_on_disk(base_tokenizer):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(embedded_checkpoint(BASE))
    assert not raw.chat_template and raw.pad_token is None
    assert raw.eos_token == "<|endoftext|>"
    # the kit gives it the base format, and pads with the unknown token, which here is the EOS itself
    assert base_tokenizer.chat_template == BASE_TEMPLATE
    assert base_tokenizer.pad_token_id == base_tokenizer.eos_token_id == raw.convert_tokens_to_ids("<|endoftext|>")


def test_a_turn_ends_with_the_tokenizers_own_eos_and_not_with_chatml(base_tokenizer):
    im_end = base_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_ids(base_tokenizer) == [base_tokenizer.eos_token_id] and im_end not in turn_end_ids(base_tokenizer)
    text = base_tokenizer.apply_chat_template(forward_messages("Name a colour.", "S_a")
                                              + [{"role": "assistant", "content": "Blue."}], tokenize=False)
    assert "<|im_start|>" not in text and "<|im_end|>" not in text and text.endswith("Blue.<|endoftext|>")
    # a chat model's own template keeps its own end of turn
    assert turn_end_ids(load_tokenizer("smollm2-135m")) == [im_end]


@pytest.mark.parametrize("example", ["forward", "backward"])
def test_labels_end_with_eos_and_padding_by_the_same_id_does_not_hide_it(base_tokenizer, example):
    eos = base_tokenizer.eos_token_id
    make = {"forward": lambda text, n: forward_example(base_tokenizer, "Say hi.", text, "S_w", n),
            "backward": lambda text, n: backward_example(base_tokenizer, "Say hi.", text, n)}[example]
    short, long = make("Hi.", 512), make("Hello there, and a good morning to you all.", 512)
    for e in (short, long):
        assert e["labels"][-1] == eos and e["input_ids"][-1] == eos
        learned = [t for t in e["labels"] if t != IGNORE_INDEX]
        assert learned.count(eos) == 1  # the answer, then its EOS: nothing of the prompt is learned
    batch = pad_batch([short, long], base_tokenizer.pad_token_id)  # pad id == eos id
    row = batch["labels"][0]
    assert int(row[len(short["labels"]) - 1]) == eos  # the short row's EOS is still a label ...
    assert (row[len(short["labels"]):] == IGNORE_INDEX).all()  # ... and the pads after it are not


@pytest.mark.slow
def test_a_model_trained_in_base_format_learns_to_stop_and_generation_stops_there(tmp_path, base_tokenizer):
    """The toy task: repeat a word. After a few dozen steps the model writes the word and then its EOS."""
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "rocket",
             "garden", "silver", "window", "bridge", "pencil", "orange"]
    train_words, new_words = words[:12], words[12:]
    examples = [forward_example(base_tokenizer, f"Repeat the word: {w}", w, "S_a", 64) for w in train_words]
    base = ModelConfig(name=BASE, dtype="float32")
    settings = TrainConfig(learning_rate=1e-3, final_learning_rate=9e-4, batch_size=4, micro_batch_size=4,
                           max_steps=24, dropout=0.0, lora_r=8, lora_alpha=16, save_steps=0)
    log = train_model(examples, base, settings, tmp_path / "model", log=lambda _: None)
    assert log["steps"][-1]["loss"] < log["steps"][0]["loss"]
    model, tokenizer = load_trained(base, tmp_path / "model")
    prompts = [{"id": w, "messages": forward_messages(f"Repeat the word: {w}", "S_a")} for w in new_words]
    replies = LocalEngine(model, tokenizer).generate(prompts, GenerateConfig(batch_size=4), 16, greedy=True,
                               progress=False)
    # Exact text from a trained model holds on any CPU here: along these replies the top-2 margins were 3.8 logits or
    # more, and the same 24 steps trained with sums split over 1 thread instead of 2 moved the logits by 0.001 (both
    # float32, a 2-core Xeon with AMX).
    assert all(r["finished"] for r in replies), replies  # every reply ended at the EOS, none at the token limit
    assert [r["text"].strip() for r in replies] == new_words  # and nothing of the template leaked into the text
    assert all(r["new_tokens"] < 16 for r in replies)


def test_a_rating_in_base_format_parses_cleanly(base_tokenizer):
    """What the generate rater decodes from a base-format reply: the EOS is not part of the text."""
    ids = base_tokenizer("Clear and complete.\nScore: 5", add_special_tokens=False)["input_ids"]
    text = base_tokenizer.decode(ids + [base_tokenizer.eos_token_id], skip_special_tokens=True)
    assert parse_score(text) == 5
    assert parse_score("Clear and complete.\nScore: 5<|im_end|>") is None  # what ChatML text on LLaMA would give



def llama_like_tokenizer(tmp_path, chat_template: str | None = None):
    """A small tokenizer built here that behaves as LLaMA-2's: adds <s> at the start, EOS </s>, unknown <unk>,
    no pad token, and (unless given one) no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from humpback_nb.infra.models import load_tokenizer

    words = ["<unk>", "<s>", "</s>", "###", "System:", "User:", "Assistant:", "Say", "hi.", "Hi.", "Answer", "in",
             "the", "style", "of", "an", "AI", "Assistant."]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # the kit loads folders with safetensors only
    return load_tokenizer(str(tmp_path))


def test_a_llama_like_tokenizer_gets_one_bos_labels_ending_with_eos_and_pads_with_unk(tmp_path):
    tokenizer = llama_like_tokenizer(tmp_path)
    example = forward_example(tokenizer, "Say hi.", "Hi.", "S_a", 64)
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1 and example["input_ids"][0] == 1
    assert example["labels"][-1] == tokenizer.eos_token_id == 2 and turn_end_ids(tokenizer) == [2]
    assert tokenizer.pad_token == "<unk>"  # a pad id apart from the EOS where the tokenizer has one


def test_a_chat_template_that_writes_the_bos_itself_does_not_get_a_second_one(tmp_path):
    from humpback_nb.infra.chat import prompt_ids

    template = "{{ bos_token }}" + BASE_TEMPLATE
    tokenizer = llama_like_tokenizer(tmp_path, chat_template=template)
    ids = prompt_ids(tokenizer, forward_messages("Say hi.", "S_a"))
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    example = forward_example(tokenizer, "Say hi.", "Hi.", "S_a", 64)  # training reads the same prompt ids
    assert example["input_ids"][: len(ids)] == ids and example["labels"][-1] == tokenizer.eos_token_id


def test_an_eos_written_inside_an_output_is_text_and_not_an_end_of_turn(base_tokenizer):
    eos = base_tokenizer.eos_token_id
    example = forward_example(base_tokenizer, "Quote the tag.", "The page ends with <|endoftext|> here.", "S_w", 128)
    learned = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert learned.count(eos) == 1 and learned[-1] == eos  # only the template's own end of turn
    assert "<|endoftext|>" in base_tokenizer.decode(learned[:-1])  # the quoted tag is still in the text
