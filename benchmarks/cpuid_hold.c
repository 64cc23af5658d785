/* A process whose CPUID answers like a lesser x86 CPU's: loaded with LD_PRELOAD by `python -m benchmarks.isa`.
 *
 * With ROTCONV_CPUID_LEVEL set to "avx2" (an AVX2-only CPU), "avx512" (AVX-512 F, CD, BW, DQ and VL, without
 * VNNI or BF16) or "avxvnni" (AVX2 with AVX-VNNI, GFNI, VAES and VPCLMULQDQ: an Intel Alder Lake kind of client
 * CPU, without AVX-512), the library asks Linux to trap the CPUID instruction in this process (arch_prctl
 * ARCH_SET_CPUID: CPUID faulting, where the CPU or hypervisor offers it) and answers each trapped CPUID itself:
 * the real answer with the feature bits of leaf 7 that such a CPU lacks cleared. Every library that asks the
 * CPU what it has (torch's cpuinfo, oneDNN, fbgemm, XNNPACK, onnxruntime's MLAS) then picks the level's
 * kernels, at native speed. Nothing else changes: the instructions still run, caches and clocks are this CPU's.
 *
 * The trap arrives as SIGSEGV. The library keeps its handler installed: a program that installs its own
 * SIGSEGV handler (Python's faulthandler, torch's DataLoader workers) gets it recorded instead, and every
 * SIGSEGV that is not a CPUID trap goes on to it, as if it had been installed. The faulting setting is kept
 * across fork and clone; an exec'd program loads the library again through LD_PRELOAD.
 *
 * rotconv_cpuid_level() says what this process holds: 1 (avx2), 2 (avx512), 3 (avxvnni), 0 (nothing asked),
 * -1 (asked, but this system cannot trap CPUID).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

typedef int (*sigaction_function)(int, const struct sigaction *, struct sigaction *);

static int held_level;
static struct sigaction program_handler; /* what the program installed for SIGSEGV (SIG_DFL at first) */
static sigaction_function real_sigaction;

static long cpuid_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

/* Leaf 7 bits beyond AVX2 (Intel SDM vol. 2A, CPUID; AMD uses the same bits). */
static void lesser_cpu(unsigned leaf, unsigned subleaf, unsigned *a, unsigned *b, unsigned *c, unsigned *d) {
    if (leaf == 7 && subleaf == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        unsigned avx512 = BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31);
        unsigned skylake_sp = BIT(16) | BIT(17) | BIT(28) | BIT(30) | BIT(31);
        *b &= ~(held_level == 2 ? avx512 & ~skylake_sp : avx512);
        /* ECX: VBMI 1, VBMI2 6, GFNI 8, VAES 9, VPCLMULQDQ 10, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        unsigned vector_crypto = BIT(8) | BIT(9) | BIT(10); /* kept for an Alder Lake kind */
        *c &= ~((BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14)) | (held_level == 3 ? 0 : vector_crypto));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, FP16 23, AMX-TILE 24, AMX-INT8 25 */
        *d &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && subleaf == 1) {
        /* EAX: AVX-VNNI 4, AVX512-BF16 5, AMX-FP16 21, AVX-IFMA 23; EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5,
         * AVX-VNNI-INT16 10, AVX10 19 */
        *a &= ~((held_level == 3 ? 0 : BIT(4)) | BIT(5) | BIT(21) | BIT(23));
        *d &= ~(BIT(4) | BIT(5) | BIT(10) | BIT(19));
    }
}

static void on_segv(int signal_number, siginfo_t *info, void *context) {
    ucontext_t *state = context;
    greg_t *registers = state->uc_mcontext.gregs;
    const unsigned char *instruction = (const unsigned char *)registers[REG_RIP];
    if (info->si_code == SI_KERNEL && instruction[0] == 0x0f && instruction[1] == 0xa2) { /* CPUID */
        unsigned leaf = (unsigned)registers[REG_RAX], subleaf = (unsigned)registers[REG_RCX], a, b, c, d;
        cpuid_faulting(0);
        __cpuid_count(leaf, subleaf, a, b, c, d);
        cpuid_faulting(1);
        lesser_cpu(leaf, subleaf, &a, &b, &c, &d);
        registers[REG_RAX] = a, registers[REG_RBX] = b, registers[REG_RCX] = c, registers[REG_RDX] = d;
        registers[REG_RIP] += 2;
        return;
    }
    /* not ours: the program's handler, or the default action when the faulting instruction runs again */
    if (program_handler.sa_flags & SA_SIGINFO) {
        program_handler.sa_sigaction(signal_number, info, context);
    } else if (program_handler.sa_handler != SIG_DFL && program_handler.sa_handler != SIG_IGN) {
        program_handler.sa_handler(signal_number);
    } else {
        struct sigaction default_action;
        memset(&default_action, 0, sizeof default_action);
        default_action.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &default_action, NULL);
    }
}

int sigaction(int signal_number, const struct sigaction *action, struct sigaction *previous) {
    if (real_sigaction == NULL)
        real_sigaction = (sigaction_function)dlsym(RTLD_NEXT, "sigaction");
    if (signal_number != SIGSEGV || held_level <= 0)
        return real_sigaction(signal_number, action, previous);
    if (previous != NULL)
        *previous = program_handler;
    if (action != NULL)
        program_handler = *action;
    return 0;
}

sighandler_t signal(int signal_number, sighandler_t handler) {
    if (signal_number != SIGSEGV || held_level <= 0) {
        sighandler_t (*real_signal)(int, sighandler_t) = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
        return real_signal(signal_number, handler);
    }
    struct sigaction action, previous;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(signal_number, &action, &previous) != 0)
        return SIG_ERR;
    return previous.sa_handler;
}

int rotconv_cpuid_level(void) { return held_level; }

__attribute__((constructor)) static void hold_cpuid(void) {
    const char *level = getenv("ROTCONV_CPUID_LEVEL");
    real_sigaction = (sigaction_function)dlsym(RTLD_NEXT, "sigaction");
    if (level == NULL || real_sigaction == NULL)
        return;
    int asked = strcmp(level, "avx2") == 0      ? 1
                : strcmp(level, "avx512") == 0  ? 2
                : strcmp(level, "avxvnni") == 0 ? 3
                                                : 0;
    if (asked == 0)
        return;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (real_sigaction(SIGSEGV, &action, &program_handler) != 0 || cpuid_faulting(1) != 0) {
        held_level = -1;
        return;
    }
    held_level = asked;
}
