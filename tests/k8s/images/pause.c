/* The pod sandbox's init process: holds the pod's namespaces open, reaps the
 * zombies of processes that share its PID namespace, and exits on SIGTERM or
 * SIGINT. Built static (gcc -static), it is the only file of the pause image. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction term = {.sa_handler = stop};
    struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGTERM, &term, 0) || sigaction(SIGINT, &term, 0) || sigaction(SIGCHLD, &child, 0)) {
        return 1;
    }
    for (;;) {
        pause();
    }
}
