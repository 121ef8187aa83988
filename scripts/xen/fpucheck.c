/*
 * fpucheck [PROCS [ITERATIONS]] — do a guest's vector registers survive
 * syscalls and context switches? PROCS processes (default 2, so that they
 * switch on one vCPU) each load a pattern into xmm9 (SSE2, which every
 * x86-64 Go program uses for memmove and friends) and, when the kernel
 * enables AVX, into ymm9 as well, yield, and compare. The Xen tier runs it
 * in a test VM first: a platform that loses register state (an emulator
 * bug) would otherwise show up as random crashes of the firewall's Go
 * runtime.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int run(uint32_t seed, long iters, int avx)
{
	uint32_t in[8] __attribute__((aligned(32))), out[8] __attribute__((aligned(32)));
	long bad = 0;
	for (long i = 0; i < iters; i++) {
		int n = avx ? 8 : 4;
		for (int k = 0; k < 8; k++)
			in[k] = seed * 2654435761u + (uint32_t)i * 40503u + k, out[k] = 0;
		/* Half the rounds yield (a switch in a syscall), half spin (a
		 * switch by preemption, or by the hypervisor, at any point). */
		if (avx) {
			asm volatile("vmovdqa %0, %%ymm9" ::"m"(in) : "xmm9");
			if (i & 1)
				sched_yield();
			else
				for (volatile int j = 0; j < 20000; j++)
					;
			asm volatile("vmovdqa %%ymm9, %0" : "=m"(out)::"xmm9");
		} else {
			asm volatile("movdqa %0, %%xmm9" ::"m"(in) : "xmm9");
			if (i & 1)
				sched_yield();
			else
				for (volatile int j = 0; j < 20000; j++)
					;
			asm volatile("movdqa %%xmm9, %0" : "=m"(out)::"xmm9");
		}
		if (memcmp(in, out, n * sizeof in[0])) {
			if (bad < 5) {
				printf("fpucheck[%u]: iteration %ld: %s9 changed:", seed, i, avx ? "ymm" : "xmm");
				for (int k = 0; k < n; k++)
					printf(" %08x/%08x", in[k], out[k]);
				printf("\n");
				fflush(stdout);
			}
			bad++;
		}
	}
	printf("fpucheck[%u]: %s: %ld of %ld iterations corrupted\n", seed, avx ? "ymm" : "xmm", bad, iters);
	return bad != 0;
}

int main(int argc, char **argv)
{
	int procs = argc > 1 ? atoi(argv[1]) : 2;
	long iters = argc > 2 ? atol(argv[2]) : 200000;
	__builtin_cpu_init();
	int avx = __builtin_cpu_supports("avx"); /* CPUID and the OS's XCR0 */
	printf("fpucheck: %d processes, %ld iterations, AVX %s\n", procs, iters, avx ? "enabled" : "not enabled");
	fflush(stdout);
	for (int i = 0; i < procs; i++)
		if (fork() == 0)
			exit(run(i + 1, iters, avx));
	int st, fail = 0;
	pid_t pid;
	while ((pid = wait(&st)) > 0) {
		if (WIFSIGNALED(st))
			printf("fpucheck: process %d killed by signal %d\n", (int)pid, WTERMSIG(st));
		fail |= !WIFEXITED(st) || WEXITSTATUS(st);
	}
	printf("fpucheck: %s\n", fail ? "FAIL" : "ok");
	return fail;
}
