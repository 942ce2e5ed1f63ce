"""One UAN training step (or eval forward) on a GPU, for a kernel profiler.

Runs a few warm-up calls (Triton compiles, caches fill), then brackets exactly
one training step (forward + backward) or one eval forward with
cudaProfilerStart/Stop, so that

    PYTHONPATH=. ncu --profile-from-start off --metrics smsp__inst_executed.sum,gpu__time_duration.sum \\
        python benchmarks/profile_step.py --backend cpp --pass train

reports every kernel of that pass and nothing else: the kernels' count is the
launches per step, and their executed instructions over the elements are the
measured counterpart of the offline census (benchmarks/census.py).
(PYTHONPATH=. lets it import an extension built in place, `setup.py build_ext --inplace`.)
"""
import argparse

import torch

import uan_kernels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpp", choices=["cpp", "triton", "reference"])
    parser.add_argument("--shape", type=int, nargs="+", default=[256, 128, 36, 36])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--components", type=int, default=3)
    parser.add_argument("--update", default="weight", choices=["weight", "moving_average"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--pass", dest="pass_name", default="train", choices=["train", "eval"])
    args = parser.parse_args(argv)

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    layer = uan_kernels.UAN(args.shape[1], args.components, update=args.update, backend=args.backend, device=device)
    x = torch.randn(args.shape, device=device, dtype=dtype)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = torch.randn_like(x)
    trainable = [p for p in layer.parameters() if p.requires_grad]

    def train_step():
        layer.train()
        torch.autograd.grad(layer(x), [x, *trainable], grad_out)

    def eval_forward():
        layer.eval()
        with torch.no_grad():
            layer(x)

    run = train_step if args.pass_name == "train" else eval_forward
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled: pass={args.pass_name} backend={args.backend} shape={tuple(args.shape)} dtype={args.dtype} K={args.components} "
          f"update={args.update} channels_last={args.channels_last} elements={x.numel()}")


if __name__ == "__main__":
    main()
