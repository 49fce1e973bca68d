/* MPI hello world for tests/cluster/test_mpi.py: rank, size, host, the sum of the ranks.
   With an argument N, each rank then sleeps N seconds (a job to interrupt). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rank, size, sum;
    char host[256];

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("rank %d of %d on %s sum %d\n", rank, size, host, sum);
    fflush(stdout);
    if (argc > 1)
        sleep(atoi(argv[1]));
    MPI_Finalize();
    return 0;
}
