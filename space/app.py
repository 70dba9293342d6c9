"""The mergekit-lowrank Space: pick LoRA adapters and a method, merge them on CPU, look at the report, try the
result, download it or push it to the Hub. Only the layout lives here; every step is a plain function of
``lowrank_space.py`` (tested without a browser in tests/test_space.py).

Run locally from a checkout: ``pip install -e ".[space]" && python space/app.py`` (http://127.0.0.1:7860).
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE if (HERE / "lowrank_methods").is_dir() else HERE.parent
ON_SPACE = bool(os.environ.get("SPACE_ID"))
if ON_SPACE:  # downloads are anonymous: a token the Space owner set must never read repos for its visitors
    os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
for path in (str(HERE), str(ROOT)):  # lowrank_space, and benchmarks/ (+ lowrank_methods/ in a deployed Space)
    if path not in sys.path:
        sys.path.insert(0, path)

import gradio as gr  # noqa: E402

import lowrank_space as logic  # noqa: E402

INTRO = f"""# mergekit-lowrank: merge LoRA adapters into one

Pick adapters (Hub ids, or the bundled example: eight MiniLM task adapters), a merge method and its parameters;
check, merge, look at the report, try the result, download it or push it to your Hub account.
One merge at a time runs (others wait in the queue); {logic.LIMITS}."""


def build_app(root: Path = ROOT, on_space: bool = ON_SPACE) -> gr.Blocks:
    """The layout; ``on_space``: sign in with Hugging Face (OAuth) instead of a token field."""
    methods = logic.methods()
    forms = logic.all_forms()
    default = "ctm" if "ctm" in forms else methods[0].name
    with gr.Blocks(title="mergekit-lowrank") as demo:
        workdir = gr.State(None, time_to_live=3 * 3600, delete_callback=logic.remove_workdir)
        merged = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=5):
                gr.Markdown("### 1. Adapters")
                example = gr.Button("Use the bundled MiniLM example (8 adapters)", elem_id="use-example", size="sm")
                adapters = gr.Textbox(label="Adapters", lines=8, elem_id="adapters",
                                      placeholder="org/lora-math@main 1.0\norg/lora-code 0.5",
                                      info="one per line: a Hub id org/name[@revision] or a bundled adapter, then "
                                           "its weight (default 1)")
                gr.Markdown("### 2. Method")
                method = gr.Dropdown([(f"{m.name} — {m.pretty_name}", m.name) for m in methods], value=default,
                                     label="Merge method", elem_id="method")
                summary = gr.Markdown(_summary(methods, default), elem_id="method-summary")
                widgets: dict[str, list] = {}
                groups = []
                for m in methods:
                    with gr.Group(visible=m.name == default, elem_id=f"form-{m.name}") as group:
                        widgets[m.name] = [(spec, _widget(m.name, spec)) for spec in forms[m.name]]
                    groups.append(group)
            with gr.Column(scale=6):
                gr.Markdown("### 3. Check and merge")
                with gr.Row():
                    check = gr.Button("Validate", elem_id="validate")
                    run = gr.Button("Merge", variant="primary", elem_id="merge")
                verdict = gr.Markdown("Nothing checked yet.", elem_id="verdict")
                with gr.Column(visible=False) as results:
                    plot = gr.Image(label="Retained energy by layer", type="filepath", elem_id="plot",
                                    interactive=False)
                    table = gr.Dataframe(label="Per module (merge_report.json)", elem_id="table", interactive=False,
                                         max_height=320)
                    with gr.Accordion("Model card (README.md)", open=False):
                        card = gr.Markdown(elem_id="card")
                    gr.Markdown("### 4. Try it (MiniLM example: each task's head, base vs merged)")
                    with gr.Row():
                        text = gr.Textbox("cat: a small domesticated carnivorous mammal with soft fur", scale=4,
                                          label="Text", elem_id="predict-text")
                        classify = gr.Button("Classify", scale=1, elem_id="classify")
                    preds = gr.Dataframe(label="Predictions", elem_id="predictions", interactive=False)
                    gr.Markdown("### 5. Take it with you")
                    with gr.Row():
                        zip_button = gr.Button("Download as .zip", elem_id="zip")
                        zipped = gr.File(label="Adapter", elem_id="zip-file", interactive=False, height=60)
                    with gr.Row():
                        repo = gr.Textbox(label="Hub repo", placeholder="your-name/merged-lora", elem_id="push-repo")
                        private = gr.Checkbox(True, label="private", elem_id="push-private")
                    if on_space:
                        gr.LoginButton()
                        token = gr.Textbox(visible=False)
                    else:
                        token = gr.Textbox(label="Hugging Face token (write access)", type="password",
                                           elem_id="push-token")
                    push = gr.Button("Push to the Hub", elem_id="push")
                    pushed = gr.Markdown(elem_id="push-result")
                recipe = gr.Code(label="Recipe (run it yourself: mergekit-lowrank merge recipe.yml out/)",
                                 language="yaml", elem_id="recipe", interactive=False)

        def values(data) -> tuple[str, str]:
            name = data[method]
            form = {spec.name: data[w] for spec, w in widgets[name]}
            return name, logic.recipe_from_form(data[adapters], name, form, root)

        inputs = {adapters, method, *[w for pairs in widgets.values() for _, w in pairs]}

        def on_check(data):
            try:
                _, text_ = values(data)
            except Exception as e:  # noqa: BLE001
                return f"**refused**: {logic.one_line(e)}", gr.update()
            result = logic.validate(text_, root)
            return _bold(result.line), text_

        def on_merge(data, progress=gr.Progress(track_tqdm=True)):
            state = data[workdir]
            try:
                _, text_ = values(data)
                logic.remove_workdir(state)
                state = logic.new_workdir()
                done = logic.merge(text_, state, lambda f, d: progress(f, desc=d), root)
            except Exception as e:  # noqa: BLE001
                line = logic.one_line(e)
                line = line if line.startswith(("refused: ", "failed: ")) else f"refused: {line}"
                return (state, None, _bold(line), *[gr.update()] * 4, gr.update(visible=False))
            s = done.report.get("summary", {})
            energy = (f", retained energy min {s['retained_energy_min']:.4f}, median {s['retained_energy_median']:.4f}"
                      if "retained_energy_min" in s else "")
            line = (f"**merged**: {done.report['method']} over {len(done.report['adapters'])} adapters, "
                    f"{s.get('modules', 0)} modules{energy}, {done.report.get('seconds', 0):.1f} s")
            frame = _frame(done.headers, done.rows)
            return (state, str(done.out), line, str(done.plot) if done.plot else None, frame, done.card,
                    done.recipe, gr.update(visible=True))

        def on_classify(out, text_):
            if not out:
                return gr.update()
            try:
                return _frame(*logic.predictions(Path(out), text_))
            except Exception as e:  # noqa: BLE001
                return _frame(["error"], [[logic.one_line(e)]])

        def on_zip(out):
            return str(logic.zip_output(Path(out))) if out else None

        def push_with(out, repo_id, private_, token_):
            if not out:
                return "merge something first"
            if not token_ and not on_space:  # a local run is its user's own: their login token may do
                from huggingface_hub import get_token

                token_ = get_token()
            try:
                url = logic.push_output(Path(out), repo_id, token_, private=private_)
            except Exception as e:  # noqa: BLE001
                return _bold(f"refused: {logic.one_line(e)}")
            return f"**pushed** to [{url}]({url}) ({'private' if private_ else 'public'})"

        if on_space:
            def on_push(out, repo_id, private_, _unused, oauth_token: gr.OAuthToken | None = None):
                return push_with(out, repo_id, private_, oauth_token.token if oauth_token else None)
        else:
            def on_push(out, repo_id, private_, token_):
                return push_with(out, repo_id, private_, token_)

        example.click(lambda: logic.example_text(root), None, adapters)
        method.change(lambda name: [gr.update(visible=g == name) for g in widgets] + [_summary(methods, name)],
                      method, groups + [summary])
        check.click(on_check, inputs, [verdict, recipe], concurrency_limit=4)
        run.click(on_merge, inputs | {workdir}, [workdir, merged, verdict, plot, table, card, recipe, results],
                  concurrency_limit=1, concurrency_id="merge")
        classify.click(on_classify, [merged, text], preds, concurrency_limit=1, concurrency_id="minilm")
        zip_button.click(on_zip, merged, zipped)
        push.click(on_push, [merged, repo, private, token], pushed, concurrency_limit=2)
    return demo


def _widget(method: str, spec: "logic.FieldSpec"):
    """The Gradio component for one generated form field."""
    common = {"label": spec.name, "info": spec.info, "elem_id": f"param-{method}-{spec.name}"}
    if spec.kind == "checkbox":
        return gr.Checkbox(bool(spec.default), **common)
    if spec.kind == "dropdown":
        return gr.Dropdown(list(spec.choices), value=spec.default, **common)
    if spec.kind == "slider":
        return gr.Slider(spec.minimum, spec.maximum, value=spec.default, step=0.01, **common)
    if spec.kind in ("integer", "number"):
        return gr.Number(spec.default, precision=0 if spec.kind == "integer" else None, minimum=spec.minimum,
                         maximum=spec.maximum, **common)
    return gr.Textbox("" if spec.default is None else str(spec.default), placeholder="empty: not set", **common)


def _summary(methods, name: str) -> str:
    m = next((m for m in methods if m.name == name), None)
    if m is None:
        return ""
    link = f" ([paper]({m.reference_url}))" if m.reference_url else ""
    return f"**{m.pretty_name}**: {m.summary}{link}"


def _bold(line: str) -> str:
    """``refused: why`` → ``**refused**: why`` (the verdict's first word in bold)."""
    head, sep, rest = line.partition(": ")
    return f"**{head}**: {rest}" if sep and " " not in head.strip() else line


def _frame(headers, rows):
    import pandas as pd

    return pd.DataFrame(rows, columns=headers)


if __name__ == "__main__":
    os.chdir(ROOT)  # the bundled example is named relative to the root, as in recipes/
    build_app().queue(default_concurrency_limit=2, max_size=32).launch()
