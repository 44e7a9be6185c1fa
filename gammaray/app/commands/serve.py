from __future__ import annotations

import argparse
import time

from gammaray.app.commands import add_config_args, config_from_args


def run(args: argparse.Namespace) -> int:
    try:
        from ray import serve  # noqa: F401 - the extra, checked before anything starts
    except ImportError:
        raise ValueError("gammaray serve needs Ray Serve: pip install 'gammaray[serve]'") from None
    from workers.evaluation.serve import start_service, stop_service

    cfg = config_from_args(args)
    service = start_service(args.checkpoint, args.index, cfg)
    print(service.summary(), flush=True)
    if args.detach:
        print(f"detached: the service runs as long as the Ray cluster (stop it with `serve shutdown` or "
              f"ray.serve.delete({service.name!r}))", flush=True)
        return 0
    print("Ctrl-C stops the service.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the service", flush=True)
        stop_service(service.name)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="an HTTP JSON embedding service (Ray Serve) for a checkpoint, with optional search",
                       description="Deploys the checkpoint's towers on Ray Serve with the preprocessing of "
                                   "training: POST /embed turns texts, images (base64 or URL) and whole catalogue "
                                   "records into L2-normalised vectors (a record's are the ones gammaray embed "
                                   "writes), POST /search looks a text and/or image up in --index. Replicas, "
                                   "CPUs/GPUs, batching, limits and the port come from the serve.* config keys. "
                                   "Runs until Ctrl-C.")
    p.add_argument("--checkpoint", required=True, metavar="URI", help="a checkpoint (run folder, checkpoint or model)")
    p.add_argument("--index", metavar="URI", help="an index (gammaray index) of the same model, for POST /search")
    p.add_argument("--detach", action="store_true",
                   help="return once the service answers and leave it running (with ray.address: a cluster that "
                        "outlives this command)")
    add_config_args(p)
    p.set_defaults(func=run)
