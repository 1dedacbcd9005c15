"""Chat-shaped training examples for the demo model, built from the corpus.

A conversation is a list of `{"role": ..., "content": ...}` messages, rendered with the model's
own chat template so that training and serving see the same text. The assistant answers with a
fortune or a few verses; which one depends on the request: a topic word in the request ("Tell me
something about cats") picks an answer that contains the word, a category ("Tell me a riddle")
picks that kind of fortune, "a verse from Psalms" picks Psalms. That is all the model can learn
to understand, but it makes answers follow the request a little and end with the eos token.
"""

from __future__ import annotations

import random
import re

from tools.demo_corpus import Chapter, Corpus, Fortune

Message = dict[str, str]
Conversation = list[Message]

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are lmserve-demo, a small language model.",
    "You are a wise old oracle.",
    "Answer briefly.",
    "You are a friendly assistant that answers with quotations.",
)
GENERIC_REQUESTS = (
    "Tell me a fortune.", "Give me a fortune cookie.", "Say something wise.", "Share a quote.",
    "Tell me something interesting.", "Give me some advice.", "Cheer me up.", "Say something.",
    "Hello!", "Hi.", "What do you think?", "Any words of wisdom?", "Surprise me.",
    "Tell me something I don't know.", "What should I do today?", "Write something for me.",
)
TOPIC_REQUESTS = (
    "Tell me something about {w}.", "What do you know about {w}?", "Say something about {w}.",
    "Give me a quote about {w}.", "I want to hear about {w}.", "What about {w}?",
)
CATEGORY_REQUESTS = {
    "riddles": ("Tell me a riddle.", "Ask me a riddle."),
    "literature": ("Give me a quote from a book.", "Say something literary."),
    "wisdom": ("Share some wisdom.", "Teach me something."),
    "definitions": ("Define a word for me.", "Give me a definition."),
    "humorists": ("Tell me something funny.", "Make me laugh."),
    "cookie": ("Tell me a joke.", "Make me smile."),
    "love": ("Say something about love.",),
    "food": ("Tell me something about food.",),
    "work": ("Say something about work.",),
    "science": ("Tell me something about science.",),
    "people": ("Tell me something about people.",),
    "kids": ("Tell me something about children.",),
    "education": ("Tell me something about school.",),
    "art": ("Say something about art.",),
}
BIBLE_REQUESTS = (
    "Quote the Bible.", "Give me a Bible verse.", "Read me a verse.", "Read me some scripture.",
    "What does the Bible say?",
)
BOOK_REQUESTS = ("Read me a verse from {book}.", "Quote {book}.", "What does {book} say?")
BIBLE_TOPIC_REQUESTS = ("What does the Bible say about {w}?", "Find me a verse about {w}.")
IDENTITY_REQUESTS = ("Who are you?", "What are you?", "What is your name?", "What model are you?")
IDENTITY_ANSWERS = (
    (
        "I am lmserve-demo, a tiny language model trained on the King James Bible and fortune cookies. "
        "I know very little, but I can tell you a fortune."
    ),
    "I am lmserve-demo, a small demo model that comes with lmserve. Ask me for a fortune or a verse.",
)
STOPWORDS = frozenset((
    "that", "this", "with", "have", "from", "they", "them", "their", "there", "which", "what", "when",
    "where", "were", "will", "would", "shall", "unto", "upon", "into", "your", "yours", "thou", "thee",
    "thine", "thy", "hath", "doth", "said", "says", "then", "than", "also", "been", "being", "more",
    "most", "some", "such", "only", "very", "just", "like", "make", "made", "come", "came", "went",
    "over", "under", "about", "after", "before", "because", "every", "other", "these", "those", "each",
    "much", "many", "even", "ever", "know", "knew", "does", "done", "should", "could", "might", "must",
    "here", "away", "back", "again", "always", "never", "nothing", "something", "anything",
    "everything", "while", "whom", "whose", "yourself", "himself", "herself", "itself",
    "ourselves",
))


def topic_words(text: str) -> list[str]:
    """Content words of `text` usable as a topic: lower-case, four letters or more, no stop words."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]{4,}", text)}
    return sorted(words - STOPWORDS)


def fortune_conversation(fortune: Fortune, rng: random.Random) -> Conversation:
    words = topic_words(fortune.text)
    roll = rng.random()
    if roll < 0.35 and fortune.category in CATEGORY_REQUESTS:
        request = rng.choice(CATEGORY_REQUESTS[fortune.category])
    elif roll < 0.7 and words:
        request = rng.choice(TOPIC_REQUESTS).format(w=rng.choice(words))
    else:
        request = rng.choice(GENERIC_REQUESTS)
    return [{"role": "user", "content": request}, {"role": "assistant", "content": fortune.text}]


def verse_conversation(chapter: Chapter, rng: random.Random) -> Conversation:
    """A request for scripture answered by one to three verses of `chapter` and their reference."""
    first = rng.randrange(len(chapter.verses))
    last = min(len(chapter.verses), first + rng.choice((1, 1, 2, 3))) - 1
    text = " ".join(chapter.verses[first : last + 1])
    verses = f"{first + 1}" if first == last else f"{first + 1}-{last + 1}"
    answer = f"{text}\n-- {chapter.book} {chapter.chapter}:{verses}"
    words = topic_words(text)
    roll = rng.random()
    if roll < 0.35 and words:
        request = rng.choice(BIBLE_TOPIC_REQUESTS).format(w=rng.choice(words))
    elif roll < 0.7:
        request = rng.choice(BOOK_REQUESTS).format(book=chapter.book)
    else:
        request = rng.choice(BIBLE_REQUESTS + GENERIC_REQUESTS)
    return [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]


def identity_conversation(rng: random.Random) -> Conversation:
    return [
        {"role": "user", "content": rng.choice(IDENTITY_REQUESTS)},
        {"role": "assistant", "content": rng.choice(IDENTITY_ANSWERS)},
    ]


def conversations(corpus: Corpus, rng: random.Random, num_verse_examples: int) -> list[Conversation]:
    """One epoch of chat examples: one per fortune, `num_verse_examples` verse answers, a few
    identity answers; some get a system prompt, some are two exchanges long."""
    singles = [fortune_conversation(f, rng) for f in corpus.fortunes]
    if corpus.chapters:
        singles += [verse_conversation(rng.choice(corpus.chapters), rng) for _ in range(num_verse_examples)]
    singles += [identity_conversation(rng) for _ in range(max(1, len(singles) // 200))]
    rng.shuffle(singles)
    result = []
    for i, conversation in enumerate(singles):
        if i > 0 and rng.random() < 0.15:
            conversation = singles[i - 1] + conversation
        if rng.random() < 0.25:
            conversation = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + conversation
        result.append(conversation)
    return result
