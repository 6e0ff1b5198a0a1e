"""Tests for benchmarks/flatness_bench.py: a smoke run, a correctness check that fails, flags."""

import json

import jax
import pytest
from launcher import load_benchmark

from tsuzuku_jax import flatness


@pytest.fixture(scope='module')
def bench():
  return load_benchmark('flatness_bench')


def test_smoke_run_writes_json(bench, tmp_path, capsys):
  out = tmp_path / 'bench.json'
  result = bench.main(['--smoke', '--models=mlp', '--torch=no', f'--out={out}'])
  printed = capsys.readouterr().out
  for text in ('Device:', 'hvp/grad', 'vmap vs loop'):
    assert text in printed
  saved = json.loads(out.read_text())
  assert saved['ok'] and saved['device']['platform'] == jax.devices()[0].platform
  r = saved['models']['mlp']
  assert r['probes'] == 4 and r['params'] == 28 * 28 * 32 + 32 + 32 * 10 + 10
  med = {k: v['median_ms'] for k, v in r['times'].items()}
  assert r['hvp_over_grad'] == pytest.approx(med['hvp'] / med['grad'])
  assert r['vmap_speedup_over_loop'] == pytest.approx(med['loop'] / med['vmap'])
  assert len(r['times']['grad']['times_ms']) == 2
  assert result['models']['mlp']['linearized_speedup_over_loop'] > 0


def test_a_wrong_hvp_fails_the_check(bench, monkeypatch, capsys):
  real = flatness.hvp
  monkeypatch.setattr(
    flatness, 'hvp', lambda f, p, v: jax.tree.map(lambda a: 1.01 * a, real(f, p, v))
  )
  with pytest.raises(SystemExit) as exit_info:
    bench.main(['--smoke', '--models=mlp', '--torch=no', '--out='])
  assert exit_info.value.code == 1
  assert 'reverse-over-reverse' in capsys.readouterr().out


def test_bad_flags_are_rejected(bench):
  assert bench.parse_args(['--models=cnn,wrn']).models == ['cnn', 'wrn']
  for bad in (['--models=resnet'], ['--models='], ['--probes=0'], ['--torch=maybe']):
    with pytest.raises(SystemExit):
      bench.parse_args(bad)


def test_pytorch_peer_matches_our_models_and_hvps(bench, capsys):
  torch = pytest.importorskip('torch', reason='the PyTorch peer needs torch (pip install torch)')
  result = bench.main(['--smoke', '--models=mlp,cnn,wrn', '--torch=yes', '--out='])
  assert 'double-backward / ours' in capsys.readouterr().out
  for name in ('mlp', 'cnn', 'wrn'):
    t = result['models'][name]['torch']
    assert t['version'] == torch.__version__ and t['device'] == 'cpu'
    med = {k: v['median_ms'] for k, v in result['models'][name]['times'].items()}
    assert t['double_backward_over_ours'] == pytest.approx(
      med['torch_double_backward'] / med['hvp']
    )


def test_a_drifting_pytorch_port_fails_the_check(bench, monkeypatch, capsys):
  pytest.importorskip('torch', reason='the PyTorch peer needs torch (pip install torch)')
  from benchmarks import flatness_torch

  real = flatness_torch.forward
  # A port that forgets the stride-2 'SAME' asymmetry would compute another network; here
  # the logits are perturbed slightly, which moves the loss and the HVP.
  monkeypatch.setattr(flatness_torch, 'forward', lambda *a: 1.01 * real(*a))
  with pytest.raises(SystemExit) as exit_info:
    bench.main(['--smoke', '--models=cnn', '--torch=yes', '--out='])
  assert exit_info.value.code == 1
  printed = capsys.readouterr().out
  assert 'PyTorch loss' in printed and 'double_backward HVP vs ours' in printed


def test_without_pytorch_auto_skips_the_peer_and_yes_refuses(bench, monkeypatch, capsys):
  import sys

  # None in sys.modules makes the import fail, as on a machine without torch.
  monkeypatch.setitem(sys.modules, 'torch', None)
  monkeypatch.setitem(sys.modules, 'benchmarks.flatness_torch', None)
  result = bench.main(['--smoke', '--models=mlp', '--out='])
  assert 'PyTorch peer skipped' in capsys.readouterr().out
  assert 'torch' not in result['models']['mlp']
  with pytest.raises(SystemExit, match='--torch=yes'):
    bench.main(['--smoke', '--models=mlp', '--torch=yes', '--out='])
