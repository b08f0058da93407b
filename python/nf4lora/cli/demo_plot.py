"""loss.png of `nf4lora demo`: training loss per step (nf4lora, and bitsandbytes + PEFT under
--compare) and test accuracy before / after / merged."""
from .outputs import save_figure


def plot_demo(path, m):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1.3]})
    steps = range(1, len(m["loss_per_step"]) + 1)
    ax.plot(steps, m["loss_per_step"], label="nf4lora QLoRA (PagedAdamW)")
    cmp = m.get("compare")
    if cmp:
        ax.plot(steps, cmp["bitsandbytes_peft"]["loss_per_step"], label="bitsandbytes + PEFT", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{m['task']['metric']}: {m['accuracy']['before']:.2f} -> {m['accuracy']['after']:.2f}")
    ax.grid(alpha=0.3)
    ax.legend()
    names = ["before", "after", "merged"]
    vals = [m["accuracy"].get(k, 0) for k in names]
    if cmp:
        names.append("bnb +\nPEFT")
        vals.append(cmp["bitsandbytes_peft"]["accuracy_after"])
    bx.bar(names, vals, color=["grey", "tab:blue", "tab:green", "tab:orange"][:len(vals)])
    bx.set_ylim(0, 1)
    bx.set_ylabel(m["task"]["metric"])
    for i, v in enumerate(vals):
        bx.text(i, v + 0.02, f"{v:.2f}", ha="center")
    parts = m["model"].rstrip("/").split("/")
    name = parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]
    fig.suptitle(f"nf4lora demo: {name}, r={m['config']['r']}, {m['config']['steps']} steps of {m['config']['batch_size']}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
