"""The engine's peak memory is one block's activations: it does not grow with the number of decoder blocks."""
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from compress.pipeline.engine import Engine
from compress.model.tiny import tiny_model
from compress.pipeline.method import Method, Needs

class Stats(Method):
    name = "stats"; family = "quantization"; layerwise = True
    needs = Needs(calibration=True, stats=("hessian", "input_norms"))
    def compress_block(self, block):
        for g in block.linear_groups():
            block.collect(g, self.stats_needed())

torch.manual_seed(0)
torch.set_num_threads(1)
layers = int(sys.argv[1])
model = tiny_model("llama", layers=layers, hidden=128, intermediate=256, heads=4, max_pos=1024)
ids = torch.randint(0, 256, (64, 512))
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.no_grad():  # warm up allocator and kernels at the same shapes
    model.model.layers[0](model.model.embed_tokens(ids[:8]), position_embeddings=model.model.rotary_emb(torch.zeros(1), torch.arange(512)[None]))
before = rss()
eng = Engine(model, ids, batch_size=8, progress=False)
eng.run([Stats()])
print(json.dumps({"delta": rss() - before, "activation_bytes": eng.peak_activation_bytes}))
"""


def _peak(layers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(layers)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_independent_of_depth():
    two, eight = _peak(2), _peak(8)
    cache = 64 * 512 * 128 * 4  # one activation buffer: 16 MiB
    assert two["activation_bytes"] == eight["activation_bytes"] == 2 * cache
    # keeping every block's activations would cost 6 more buffers (96 MiB) for 8 blocks than for 2
    assert eight["delta"] - two["delta"] < 1.5 * cache, (two, eight)
