"""The chat format every model of the kit reads and writes: how a conversation becomes token ids.

A conversation is a list of `Message`s (system, user, assistant turns). It is rendered with the tokenizer's
chat template; a tokenizer without one (a base model such as LLaMA) gets BASE_TEMPLATE, whose assistant turn
ends with the tokenizer's own EOS, so that a trained model stops where generation stops (`turn_end_ids`).
What the turns say (the method's prompts and tags) lives in `humpback_nb.method.prompts`.
"""

from __future__ import annotations

# For tokenizers that come without a chat template (base models such as LLaMA-2-7B). Plain-text headers, and
# the assistant's turn ends with the tokenizer's EOS (`</s>` for LLaMA): labels end with it, and generation
# stops at it. ChatML's `<|im_end|>` would be ordinary text for such a tokenizer: the model would learn to write
# it, generation would never stop there, and every reply would run to its token limit with markers in it.
BASE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

Message = dict[str, str]
IGNORE_INDEX = -100  # label of a token that does not count in the loss


def fit_text(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut to at most `max_tokens` tokens (at a token boundary), so that a prompt fits the context."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of a prompt, ending where the assistant's answer begins: the same in training and generation."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return rendered_ids(tokenizer, text)


def rendered_ids(tokenizer, text: str) -> list[int]:
    """Token ids of the start of a rendered conversation: with the tokenizer's BOS (LLaMA's `<s>`) added, unless
    the chat template wrote it already (LLaMA-2-chat's does): one BOS either way."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def turn_end_ids(tokenizer) -> list[int]:
    """The token ids at which an assistant's turn ends in this tokenizer's format, where generation stops: the
    EOS, and any special token the chat template writes after the assistant's text (ChatML's `<|im_end|>`,
    LLaMA-3's `<|eot_id|>`)."""
    probe = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": "y"}], tokenize=False)
    if not full.startswith(prompt + "y"):
        raise ValueError("the chat template renders the prompt differently inside a full conversation")
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    tail = tokenizer(full[len(prompt) + 1:], add_special_tokens=False)["input_ids"]
    ends = [i for i in tail if i in special]
    if tokenizer.eos_token_id is not None:
        ends.append(tokenizer.eos_token_id)
    if not ends:
        raise ValueError("this tokenizer has no EOS and its chat template ends a turn with no special token: "
                         "generation could never stop")
    return sorted(set(ends))


# -- examples as the model reads them: input ids and labels, right-padded -----------------------------------------
def pad_batch(features: list[dict[str, list[int]]], pad_token_id: int) -> dict:
    """Right-pad a batch. No attention mask is needed: with causal attention a real token never sees the pads
    after it, and pads are out of the loss. `logits_to_keep` marks the positions whose next token is learned
    (`loss_mask`): only there are the vocabulary logits computed, one row of logits each."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "labels": []}
    for f in features:
        pad = width - len(f["input_ids"])
        batch["input_ids"].append(f["input_ids"] + [pad_token_id] * pad)
        batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
    tensors = {key: torch.tensor(value) for key, value in batch.items()}
    tensors["logits_to_keep"] = loss_mask(tensors["labels"])
    return tensors


def loss_mask(labels):
    """True at each position p whose logits predict a learned token (labels[:, p + 1] is not IGNORE_INDEX).

    Given as `logits_to_keep`, transformers (5.21 on) computes the vocabulary head on those positions alone and
    returns their logits as rows (learned tokens, vocabulary), in the order of the mask. Positions shared by the
    whole batch, the older form, computed the head on prompt tokens of the other rows too, and the gradient of
    selecting the learned rows then filled a zero tensor of the whole batch's logits: a tenth of a training step."""
    mask = labels.new_zeros(labels.shape).bool()
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask
