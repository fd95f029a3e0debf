"""Double of modules/shared.py: options, job state and the loaded model."""

from types import SimpleNamespace

DEFAULT_OPTS = dict(
    batch_cond_uncond=True, skip_early_cond=0.0, s_min_uncond_all=False, pad_cond_uncond=False,
    pad_cond_uncond_v0=False, api_enable_requests=False, live_preview_content="Prompt",
    img2img_fix_steps=False, hires_fix_refiner_pass="second pass", refiner_switch_by_sample_steps=False,
    CLIP_stop_at_last_layers=1, eta_ancestral=1.0, eta_ddim=0.0, s_noise=1.0,
)


class Options(SimpleNamespace):
    def reset(self):
        self.__dict__.clear()
        self.__dict__.update(DEFAULT_OPTS)


class State:
    def __init__(self):
        self.reset()

    def reset(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.job_count = 0
        self.interrupt_at_step = None  # test hook: interrupt when the sampler reaches this step

    def interrupt(self):
        self.interrupted = True

    def begin(self, job=""):
        self.interrupted = False
        self.skipped = False

    def end(self):
        pass


opts = Options(**DEFAULT_OPTS)
state = State()
sd_model = None
cmd_opts = SimpleNamespace(api=True, nowebui=False, medvram=False, lowvram=False, medvram_sdxl=False,
                           opt_sdp_no_mem_attention=False)
