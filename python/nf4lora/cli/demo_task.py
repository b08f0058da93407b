"""The demo's task, generated here (nothing downloaded): topic classification of short English
sentences into LABELS. Sentences come from templates filled with topic words; the test split uses
topic words the training split never shows, so the trained model must lean on what the pretrained
model knows about words, not memorize them. A causal LM trains on the same text as next-token
prediction.

    train, test = make_task(n_train=512, n_test=256, seed=0)   # lists of (text, label)
"""
import random

LABELS = ("sports", "food", "weather", "technology")

# topic words: the first two thirds go to training sentences, the rest only to test sentences
WORDS = {
    "sports": ["football", "the striker", "the goalkeeper", "tennis", "the marathon", "basketball",
               "the referee", "the championship", "the stadium", "the coach", "a penalty kick",
               "the relay race", "cricket", "the swimmer", "the league final", "hockey",
               "the boxing match", "a slam dunk", "the cyclist", "the trophy", "the world cup"],
    "food": ["the pasta", "a chocolate cake", "the soup", "fresh bread", "the pizza", "the salad",
             "the chef", "grilled salmon", "the bakery", "a spicy curry", "the dessert", "pancakes",
             "the omelette", "roasted vegetables", "the sushi", "the recipe", "a bowl of noodles",
             "the cheese", "apple pie", "the sandwich", "the restaurant menu"],
    "weather": ["the rain", "a thunderstorm", "the snow", "the forecast", "strong wind", "the fog",
                "a heat wave", "the clouds", "a hurricane", "the temperature", "heavy showers",
                "the frost", "a blizzard", "the humidity", "sunshine", "the drought", "hail",
                "a tornado", "the monsoon", "a cold front", "the drizzle"],
    "technology": ["the laptop", "the new smartphone", "the software update", "the processor",
                   "the website", "a computer virus", "the database", "the robot", "the app",
                   "the internet connection", "the graphics card", "the server", "a programming bug",
                   "the operating system", "the keyboard", "the algorithm", "the cloud storage",
                   "the compiler", "a microchip", "the touchscreen", "the router"],
}

TEMPLATES = [
    "{w} was the main topic of the evening.",
    "Everyone kept talking about {w} yesterday.",
    "I read a long article about {w} this morning.",
    "The news today was all about {w}.",
    "My friend cannot stop thinking about {w}.",
    "We argued for an hour about {w}.",
    "Have you heard what happened with {w}?",
    "There was a surprising story involving {w}.",
    "Nobody expected {w} to change so much.",
    "She wrote a short report on {w} and {v}.",
    "Last week {w} and {v} were in every conversation.",
    "The podcast compared {w} with {v}.",
]


def _split(words):
    cut = (2 * len(words)) // 3
    return words[:cut], words[cut:]


def _sentences(n, split, rng):
    out = []
    for i in range(n):
        label = i % len(LABELS)
        words = _split(WORDS[LABELS[label]])[split]
        w, v = rng.sample(words, 2)
        text = rng.choice(TEMPLATES).format(w=w, v=v)
        out.append((text[0].upper() + text[1:], label))
    rng.shuffle(out)
    return out


def make_task(n_train=512, n_test=256, seed=0):
    """(train, test): lists of (sentence, label index into LABELS), balanced across labels; test
    sentences use only topic words absent from training."""
    rng = random.Random(seed)
    return _sentences(n_train, 0, rng), _sentences(n_test, 1, rng)


def lm_text(n_sentences=256, seed=0):
    """Training and test text for a causal LM: the same sentences, one per line."""
    train, test = make_task(n_sentences, n_sentences // 2, seed)
    return [t for t, _ in train], [t for t, _ in test]
