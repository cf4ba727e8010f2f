"""Generate text with a tfglm model served by TF Serving, over gRPC (tensorflow-serving-api comes with tfglm).

    python export/grpc_client.py --model tiny --prompt "ROMEO:" --prompt "JULIET:" --max-new-tokens 50 --seed 1

Options left out are not sent: the server fills in the model's defaults (its run's `generate` config).
"""

import argparse
import sys

import grpc
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

OPTIONAL = {"max_new_tokens": tf.int32, "temperature": tf.float32, "top_k": tf.int32, "top_p": tf.float32,
            "seed": tf.int32}


def predict_request(model, prompts, **options):
    """A `generate` PredictRequest: `prompts` plus the options that are not None."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "generate"
    request.inputs["prompts"].CopyFrom(tf.make_tensor_proto(prompts, dtype=tf.string))
    for name, value in options.items():
        if value is not None:
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=OPTIONAL[name]))
    return request


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="localhost:8500", help="TF Serving gRPC address")
    parser.add_argument("--model", required=True, help="model name in models.config")
    parser.add_argument("--prompt", action="append", required=True, help="seed text (repeat for several prompts)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 is greedy")
    parser.add_argument("--top-k", type=int, help="0 disables")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds")
    args = parser.parse_args(argv)
    request = predict_request(args.model, args.prompt, **{name: getattr(args, name) for name in OPTIONAL})
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(args.server))
    try:
        response = stub.Predict(request, timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"grpc_client: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    completions = tf.make_ndarray(response.outputs["completions"])
    for prompt, completion in zip(args.prompt, completions):
        print(prompt + completion.decode("utf-8", errors="replace"))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
