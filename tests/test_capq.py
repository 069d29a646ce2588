"""CaP-Q: the needle and LongBench tasks hand their question to the method, which uses it as the catalyst."""

from kvx.engine import Engine
from kvx.methods.infinipot import InfiniPot
from kvx.tasks.base import RunContext
from kvx.tasks.needle import Needle


def test_needle_question_becomes_the_catalyst(stories, assets):
    model, tok = stories
    method = InfiniPot(budget=128, keep=64, cap_question=True)
    eng = Engine(model, tok, method)
    seen = []
    orig = method.set_question
    method.set_question = lambda ids: (seen.append(ids), orig(ids))[1]
    task = Needle(context_lengths=[300], depths=[50], max_new_tokens=4, variant="passkey")
    task.run(eng, RunContext())
    question = task._spec()[1]
    want = tok(question, add_special_tokens=False).input_ids
    assert seen == [want]
    room = (128 - 64) // 2
    assert method.catalyst() == want[-room:]
